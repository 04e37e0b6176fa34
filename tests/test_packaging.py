"""How criserver is packaged and installed: pyproject metadata, and the Debian packages
`make deps` installs (without recommends, so everything used must come through Depends)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Files the daemon, the guest build or the tests use, owned by Debian packages. The QEMU
# firmware is loaded by QEMU itself: microvm's qboot, q35's SeaBIOS and the virtio-net option
# ROM, the -kernel loaders, and TCG, which is a module of Debian's QEMU.
USED_FILES = [
    "/usr/bin/qemu-system-x86_64",
    "/usr/bin/qemu-img",
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/seabios/bios-256k.bin",
    "/usr/lib/ipxe/qemu/efi-virtio.rom",
    "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
    "/usr/sbin/runc",
    "/bin/busybox",
    "/usr/bin/mkfs.erofs",
    "/usr/bin/cpio",
    "/usr/bin/lz4",
    "/usr/bin/zstd",
    "/usr/bin/strip",
    "/usr/lib/x86_64-linux-gnu/libseccomp.a",
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/portmap",
    "/usr/sbin/iptables",
    "/usr/sbin/tc",
    "/usr/bin/skopeo",
    "/usr/bin/docker-registry",
    "/usr/bin/htpasswd",
    "/usr/bin/socat",
    # The registry client verifies TLS against the system's CA store.
    "/etc/ssl/certs/ca-certificates.crt",
]


def _make_value(variable: str) -> str:
    out = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "--eval", f"print-var: ; @echo $({variable})",
         "print-var"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_license_is_an_spdx_expression() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"
    # setuptools reads project.license as an SPDX string from 77.0 on; older ones refuse it.
    (requirement,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
    assert match and int(match.group(1)) >= 77, requirement


def test_setuptools_reads_the_metadata_without_deprecations() -> None:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in seen if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "Apache-2.0"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_deps_installs_without_recommends() -> None:
    recipe = subprocess.run(["make", "-n", "-C", str(ROOT), "deps"], capture_output=True,
                            text=True, check=True).stdout
    installs = [line for line in recipe.splitlines() if "apt-get install" in line]
    assert installs and all("--no-install-recommends" in line for line in installs), recipe


@pytest.mark.skipif(not (shutil.which("apt-cache") and shutil.which("dpkg") and
                         shutil.which("make")), reason="needs a Debian host")
def test_used_files_come_through_depends_of_the_listed_packages() -> None:
    """Installing APT_PACKAGES without recommends must still bring every file we use."""
    packages = _make_value("APT_PACKAGES").split()
    assert packages
    present = [f for f in USED_FILES if os.path.exists(f)]
    if not present:
        pytest.skip("none of the packages is installed here")
    owners = subprocess.run(["dpkg", "-S", *present], capture_output=True, text=True,
                            check=False).stdout
    needed: dict[str, set[str]] = {}
    for line in owners.splitlines():
        names, _, path = line.partition(": ")
        for name in names.split(", "):
            needed.setdefault(name.split(":")[0], set()).add(path)
    closure = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
        capture_output=True, text=True, check=True).stdout
    reached = {line for line in closure.splitlines() if line and not line.startswith((" ", "<"))}
    missing = {name: sorted(paths) for name, paths in needed.items() if name not in reached}
    assert missing == {}, "reached only through Recommends (or not at all): add to APT_PACKAGES"
