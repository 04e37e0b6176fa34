"""Build the guest assets: an uncompressed vmlinux, a small initramfs (busybox, modules, /init)
and a read-only erofs root (python3.11, crun, runc, busybox, the agent and its wheels).

Everything comes from installed Debian packages plus pinned wheels, and lands content-addressed in
`<assets dir>/<sha256>/` with a manifest and a `current` symlink. This is a build tool run by
`make guest`, not daemon code: it runs synchronously and never inside the daemon's event loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from criserver.vm import assets as assets_mod

log = logging.getLogger("criserver.guestbuild")

# This tool lives in the repository's guest/ directory, beside what it builds.
GUEST_SRC = Path(__file__).resolve().parent
REPO_ROOT = GUEST_SRC.parent
BUILDER_VERSION = 1

PYTHON = "python3.11"
CC = "gcc"
VMEXEC_SOURCE = "vmexec.c"
VMEXEC_PATH = "/usr/lib/criserver/vmexec"  # where vmagent.fastexec looks for it
ROOT_SERIAL = "criserver-root"
# The root is read-only and built together with its .pyc: checking a hash would only re-read and
# hash every imported .py under emulation (about 0.5 s of the agent's start under TCG).
PYC_MODE = "unchecked-hash"

# The wheel closure is pinned in full so that pip never resolves anything at build time.
WHEELS = (
    "grpclib==0.4.9",
    "protobuf==7.36.2",
    "h2==4.4.1",
    "hpack==4.2.0",
    "hyperframe==6.1.0",
    "multidict==7.2.1",
    # The agent's event loop: libuv in C instead of asyncio's Python loop (about a third of
    # the agent's time per call under TCG was the loop's own Python).
    "uvloop==0.23.0",
)

# Module groups loaded by /init (see guest/init.sh). Names are the top-level modules; their
# dependencies come from modules.dep / modules.softdep, so only leaves are listed here.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("virtio_blk", "erofs"),
    "mmio": ("virtio_mmio",),
    "pci": ("virtio_pci",),
    "serial": ("virtio_console",),
    "vsock": ("vmw_vsock_virtio_transport",),
    "net": ("virtio_net",),
    "overlay": ("overlay",),
    "9p": ("9pnet_virtio", "9p"),
    # Image files (EROFS) from the 9p images share are loop-mounted by the agent.
    "loop": ("loop",),
    # QEMU's ISA pvpanic is an ACPI device (QEMU0001) on both machines: pvpanic_mmio drives it.
    "pvpanic": ("pvpanic_mmio",),
    # virtio-balloon: free page reporting hands pages the guest frees back to the host.
    "balloon": ("virtio_balloon",),
}
# Flavours without a module (the cloud kernel has no 9p) simply lack that group.

# Modules the guest loads only on demand: the kernel asks /sbin/modprobe (busybox, reading the
# root's modules.dep and modules.alias) when a container creates a bridge, a veth, a vxlan, an
# nftables rule... Files on the erofs root cost nothing at boot. Paths under the kernel's
# modules dir; their dependencies come along.
ON_DEMAND_MODULES = (
    "kernel/net/802/", "kernel/net/8021q/", "kernel/net/bridge/", "kernel/net/llc/",
    "kernel/net/core/", "kernel/net/ipv4/", "kernel/net/ipv6/", "kernel/net/netfilter/",
    "kernel/net/sched/", "kernel/net/xfrm/", "kernel/net/key/", "kernel/net/packet/",
    "kernel/net/sctp/", "kernel/net/tls/", "kernel/net/psample/", "kernel/net/openvswitch/",
    "kernel/net/mpls/", "kernel/net/nsh/", "kernel/net/vmw_vsock/",
    "kernel/drivers/net/bonding/", "kernel/drivers/net/ipvlan/", "kernel/drivers/net/team/",
    "kernel/drivers/net/vxlan/", "kernel/drivers/net/wireguard/",
    "kernel/drivers/net/dummy.ko", "kernel/drivers/net/geneve.ko", "kernel/drivers/net/ifb.ko",
    "kernel/drivers/net/macvlan.ko", "kernel/drivers/net/macvtap.ko",
    "kernel/drivers/net/nlmon.ko", "kernel/drivers/net/tap.ko", "kernel/drivers/net/tun.ko",
    "kernel/drivers/net/veth.ko", "kernel/drivers/net/vrf.ko",
    "kernel/fs/fuse/", "kernel/fs/overlayfs/",
)

# Stdlib parts the agent never needs. Directories and files relative to /usr/lib/python3.11.
STDLIB_DROP_DIRS = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "unittest",
    "sqlite3",
    "dbm",
    "curses",
    "venv",
    "xmlrpc",
    "wsgiref",
    "msilib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "__phello__",
    "config-3.11-x86_64-linux-gnu",
}
STDLIB_DROP_FILES = {
    "turtle.py",
    "pydoc.py",
    "doctest.py",
    "_pydecimal.py",
    "tabnanny.py",
    "mailbox.py",
    "imaplib.py",
    "nntplib.py",
    "smtplib.py",
    "poplib.py",
    "ftplib.py",
    "telnetlib.py",
    "pdb.py",
    "cProfile.py",
    "profile.py",
    "pstats.py",
    "sitecustomize.py",
}
# Encodings: Python's start-up needs utf_8/latin_1/ascii/aliases; the rest are cheap common ones.
ENCODINGS_KEEP = {
    "__init__.py",
    "aliases.py",
    "utf_8.py",
    "utf_8_sig.py",
    "latin_1.py",
    "ascii.py",
    "idna.py",
    "punycode.py",
    "raw_unicode_escape.py",
    "unicode_escape.py",
    "utf_16.py",
    "utf_16_le.py",
    "utf_16_be.py",
    "utf_32.py",
    "utf_32_le.py",
    "utf_32_be.py",
    "charmap.py",
    "cp437.py",
    "base64_codec.py",
    "hex_codec.py",
}
DYNLOAD_DROP = re.compile(
    r"^(_test|xxlimited|_xxtestfuzz|_ctypes_test|_curses|readline|_dbm|_gdbm|_sqlite3|_tkinter|"
    r"nis|ossaudiodev|audioop|_codecs_(cn|hk|iso2022|jp|kr|tw)|_xxsubinterpreters|_lsprof)"
)
# Tests, docs and build leftovers inside wheels.
WHEEL_DROP = re.compile(r"(^|/)(tests?|__pycache__)(/|$)|\.(pyi|c|h|md|rst|txt)$")


class BuildError(Exception):
    """A guest asset build step failed; the message names the step."""


@dataclass(frozen=True)
class BuildConfig:
    assets_dir: Path
    flavour: str = "amd64"  # Debian kernel flavour: amd64 (has 9p) or cloud
    kernel_release: str | None = None  # default: newest installed of the flavour
    repo_root: Path = REPO_ROOT
    cache_dir: Path = Path("/var/cache/criserver/guestbuild")
    force: bool = False
    pyc_mode: str = PYC_MODE
    keep: int = 2  # installed versions kept, `current` included


@dataclass
class Sources:
    """Everything the build reads, resolved up front so the inputs hash covers it."""

    kernel_release: str
    kernel_image: Path
    modules_dir: Path
    module_groups: dict[str, list[str]]  # group -> module names in load order
    module_files: dict[str, Path]  # module name -> .ko
    on_demand_modules: list[str]  # paths under modules_dir, for the root's modprobe
    host_files: list[Path]  # binaries, libraries and stdlib files copied from the host
    agent_dir: Path
    agent_kind: str  # "vmagent" (the repo's) or "standin"
    wheels: list[Path]
    packages: dict[str, str] = field(default_factory=dict)  # Debian package -> version


# --- small helpers ---------------------------------------------------------------------------


def _run(step: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip()[-2000:]
        raise BuildError(f"{step}: {argv[0]} exited {e.returncode}: {err}") from e
    except FileNotFoundError as e:
        raise BuildError(f"{step}: {argv[0]} not found (install it)") from e


def _tree_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            yield Path(dirpath) / name


# --- kernel ----------------------------------------------------------------------------------


def _find_kernel(cfg: BuildConfig) -> str:
    suffix = "-cloud-amd64" if cfg.flavour == "cloud" else "-amd64"
    if cfg.kernel_release:
        return cfg.kernel_release
    releases = [
        p.name.removeprefix("vmlinuz-")
        for p in Path("/boot").glob("vmlinuz-*")
        if p.name.endswith(suffix) and (cfg.flavour == "cloud") == ("-cloud-" in p.name)
    ]
    if not releases:
        raise BuildError(
            f"find kernel: no /boot/vmlinuz-*{suffix} (apt-get install linux-image{suffix})"
        )

    def version_key(rel: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", rel)]

    return max(releases, key=version_key)


def extract_vmlinux(bzimage: Path) -> bytes:
    """Return the uncompressed ELF vmlinux inside a bzImage (QEMU boots it via its PVH note).

    The boot protocol header (>= 2.08) gives the exact payload offset and length, so no
    magic-number scanning is needed.
    """
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise BuildError(f"extract vmlinux: {bzimage} is not a bzImage")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    # The kernel build appends the decompressed size (le32) after the compressed stream.
    if payload.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x02\x21\x4c\x18"):  # lz4 legacy frame
        out = _run("extract vmlinux (lz4)", ["lz4", "-dc"], input=payload[:-4]).stdout
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        out = _run("extract vmlinux (zstd)", ["zstd", "-dc"], input=payload[:-4]).stdout
    elif payload.startswith(b"\x1f\x8b"):
        import gzip

        out = gzip.decompress(payload)
    else:
        raise BuildError(f"extract vmlinux: unknown compression {payload[:6].hex()} in {bzimage}")
    if not out.startswith(b"\x7fELF"):
        raise BuildError(f"extract vmlinux: payload of {bzimage} is not an ELF file")
    return out


# --- modules ---------------------------------------------------------------------------------


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def resolve_modules(
    modules_dir: Path, groups: dict[str, tuple[str, ...]]
) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """Order each group's modules with their dependencies first, from modules.dep/softdep."""
    deps: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = _module_name(target)
        files[name] = modules_dir / target
        deps[name] = [_module_name(d) for d in rest.split()]
    aliases: dict[str, list[str]] = {}
    alias_file = modules_dir / "modules.alias"
    if alias_file.exists():
        for line in alias_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias":
                aliases.setdefault(parts[1], []).append(parts[2].replace("-", "_"))
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    softdep_file = modules_dir / "modules.softdep"
    if softdep_file.exists():
        for line in softdep_file.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[0] != "softdep" or parts[1] not in files:
                continue
            pre = parts[parts.index("pre:") + 1 :] if "pre:" in parts else []
            pre = pre[: pre.index("post:")] if "post:" in pre else pre
            for want in pre:
                if want in builtin or f"{want}_generic" in builtin:
                    continue  # built into the kernel (cloud: crc32c): nothing to load
                choices = [want] if want in files else aliases.get(want, [])
                # TCG's default CPU lacks the SIMD the arch-optimised variants (crc32c-intel)
                # need: prefer the portable *_generic implementation when there is one.
                choices = sorted(choices, key=lambda n: (not n.endswith("_generic"), n))
                if choices and choices[0] in files:
                    deps[parts[1]] = [choices[0], *deps[parts[1]]]

    def visit(name: str, stack: tuple[str, ...], order: list[str]) -> None:
        if name in order:
            return
        if name in stack:
            raise BuildError(f"resolve modules: dependency cycle at {name}")
        for dep in deps.get(name, []):
            visit(dep, (*stack, name), order)
        order.append(name)

    ordered: dict[str, list[str]] = {}
    for group, leaves in groups.items():
        present = [leaf for leaf in leaves if leaf in files]
        if not present:
            continue  # e.g. no 9p in the cloud flavour: the group does not exist there
        order: list[str] = []
        for leaf in present:
            visit(leaf, (), order)
        ordered[group] = order
    used = {m for order in ordered.values() for m in order}
    return ordered, {m: files[m] for m in sorted(used)}


def on_demand_modules(modules_dir: Path, prefixes: Iterable[str]) -> list[str]:
    """Paths (relative to `modules_dir`) of the modules under `prefixes` and their dependencies,
    from modules.dep."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    wanted = [t for t in deps if t.startswith(tuple(prefixes))]
    chosen: set[str] = set()
    while wanted:
        target = wanted.pop()
        if target not in chosen:
            chosen.add(target)
            wanted.extend(deps.get(target, ()))
    return sorted(chosen)


def install_modules(modules_dir: Path, paths: list[str], dest: Path) -> None:
    """Copy modules into `dest` (the root's /lib/modules/<release>) with a modules.dep and a
    modules.alias limited to them: what busybox modprobe reads."""
    chosen = set(paths)
    for rel in paths:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules_dir / rel, dest / rel)
    dep_lines = [line for line in (modules_dir / "modules.dep").read_text().splitlines()
                 if line.partition(":")[0] in chosen]
    (dest / "modules.dep").write_text("".join(f"{line}\n" for line in dep_lines))
    names = {_module_name(rel) for rel in paths}
    alias_lines = []
    alias_file = modules_dir / "modules.alias"
    if alias_file.exists():
        for line in alias_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias" and _module_name(parts[2]) in names:
                alias_lines.append(line)
    (dest / "modules.alias").write_text("".join(f"{line}\n" for line in alias_lines))


# --- python, libraries, packages -------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    base = Path("/usr/lib") / PYTHON
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel = Path(dirpath).relative_to(base)
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_DROP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if rel == Path(".") and name in STDLIB_DROP_FILES:
                continue
            if rel == Path("encodings") and name not in ENCODINGS_KEEP:
                continue
            if rel == Path("lib-dynload") and DYNLOAD_DROP.match(name):
                continue
            if not p.exists():  # dangling Debian symlinks (sitecustomize -> /etc)
                continue
            if name.endswith((".py", ".so")) or rel != Path("."):
                out.append(p)
    return out


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _shared_libs(binaries: Iterable[Path]) -> list[Path]:
    """Libraries the given ELF files load, from one ldd call."""
    elfs = [str(b) for b in binaries if _is_elf(b)]
    proc = subprocess.run(["ldd", *elfs], capture_output=True, text=True)
    libs: set[Path] = set()
    for line in proc.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.add(Path(m.group(1)))
    return sorted(libs)


def _debian_packages(paths: Iterable[Path]) -> dict[str, str]:
    """Debian package name -> version owning the given host files (dpkg -S, one call)."""
    queries: list[str] = []
    for p in paths:
        # dpkg's database keeps the pre-usrmerge paths (/lib/...), ldd reports either form.
        queries.append(str(p))
        s = str(p)
        if s.startswith("/usr/lib/") or s.startswith("/usr/bin/") or s.startswith("/usr/sbin/"):
            queries.append(s[4:])
        elif s.startswith(("/lib/", "/bin/", "/sbin/", "/lib64/")):
            queries.append("/usr" + s)
    proc = subprocess.run(["dpkg", "-S", *queries], capture_output=True, text=True)
    names: set[str] = set()
    for line in proc.stdout.splitlines():
        pkgs, _, _path = line.partition(": ")
        for pkg in pkgs.split(", "):
            if not pkg.startswith("diversion"):
                names.add(pkg.split(":")[0])
    if not names:
        return {}
    fmt = "${Package}\t${Version}\n"
    q = _run("package versions", ["dpkg-query", "-W", "-f", fmt, *sorted(names)])
    versions: dict[str, str] = {}
    for line in q.stdout.decode().splitlines():
        name, _, version = line.partition("\t")
        versions[name] = version
    return dict(sorted(versions.items()))


def _fetch_wheels(cache_dir: Path) -> list[Path]:
    """Download the pinned wheels once into the cache (pip's usual client); reuse them after."""
    wheel_dir = cache_dir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wanted = {w.split("==")[0].replace("-", "_").lower(): w.split("==")[1] for w in WHEELS}
    have = {}
    for whl in wheel_dir.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        if wanted.get(name.lower()) == version:
            have[name.lower()] = whl
    if len(have) < len(wanted):
        _run(
            "download wheels",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                "--dest",
                str(wheel_dir),
                *WHEELS,
            ],
        )
        return _fetch_wheels_present(wheel_dir, wanted)
    return sorted(have.values())


def _fetch_wheels_present(wheel_dir: Path, wanted: dict[str, str]) -> list[Path]:
    found = []
    for whl in sorted(wheel_dir.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        if wanted.get(name.lower()) == version:
            found.append(whl)
    if len(found) != len(wanted):
        raise BuildError(f"download wheels: expected {sorted(wanted)}, found {found}")
    return found


def resolve_sources(cfg: BuildConfig) -> Sources:
    release = _find_kernel(cfg)
    modules_dir = Path("/lib/modules") / release
    if not modules_dir.is_dir():
        raise BuildError(f"resolve sources: {modules_dir} missing")
    groups, module_files = resolve_modules(modules_dir, MODULE_GROUPS)
    for needed in ("core", "mmio", "pci", "serial"):
        if needed not in groups:
            raise BuildError(f"resolve modules: group {needed} has no module in {release}")

    # crun runs the containers (a C runtime: a fraction of Go runc's start-up cost under TCG);
    # runc stays for guests told to use it (the agent's oci_runtime setting).
    binaries = [Path("/usr/bin") / PYTHON, Path("/usr/bin/crun"), Path("/usr/sbin/runc"),
                Path("/bin/busybox")]
    for b in binaries:
        if not b.exists():
            raise BuildError(
                f"resolve sources: {b} missing "
                f"(apt-get install python3.11 crun runc busybox-static)"
            )
    stdlib = _stdlib_files()
    wheels = _fetch_wheels(cfg.cache_dir)
    # Extension modules inside wheels (protobuf's upb, multidict) need host libs too (libstdc++).
    wheel_sos = _wheel_extension_libs(wheels, cfg.cache_dir)
    libs = _shared_libs([*binaries, *(p for p in stdlib if p.suffix == ".so")])
    libs = sorted(set(libs) | set(wheel_sos))
    agent_dir = cfg.repo_root / "vmagent"
    agent_kind = "vmagent"
    if not (agent_dir / "__main__.py").exists():
        agent_dir = GUEST_SRC / "standin-vmagent" / "vmagent"
        agent_kind = "standin"
    host_files = [*binaries, *libs, *stdlib]
    return Sources(
        kernel_release=release,
        kernel_image=Path("/boot") / f"vmlinuz-{release}",
        modules_dir=modules_dir,
        module_groups=groups,
        module_files=module_files,
        on_demand_modules=on_demand_modules(modules_dir, ON_DEMAND_MODULES),
        host_files=host_files,
        agent_dir=agent_dir,
        agent_kind=agent_kind,
        wheels=wheels,
        packages=_debian_packages(
            [
                *binaries,
                *libs,
                Path(f"/boot/vmlinuz-{release}"),
                # One file of each stdlib package: libpython3.11-minimal and -stdlib.
                Path(f"/usr/lib/{PYTHON}/os.py"),
                Path(f"/usr/lib/{PYTHON}/asyncio/__init__.py"),
            ]
        ),
    )


def _wheel_extension_libs(wheels: list[Path], cache_dir: Path) -> list[Path]:
    import zipfile

    out: set[Path] = set()
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        sos = []
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    if name.endswith(".so"):
                        sos.append(Path(z.extract(name, tmp)))
        if sos:
            out.update(_shared_libs(sos))
    return sorted(out)


def inputs_digest(cfg: BuildConfig, src: Sources) -> str:
    """Hash of everything that shapes the output; equal digest -> the build can be skipped."""
    h = hashlib.sha256()
    desc = {
        "builder": BUILDER_VERSION,
        "builder_sha256": assets_mod.sha256_file(Path(__file__)),
        "init_sha256": assets_mod.sha256_file(GUEST_SRC / "init.sh"),
        "vmexec_sha256": assets_mod.sha256_file(GUEST_SRC / VMEXEC_SOURCE),
        "vmexec_toolchain": _vmexec_toolchain(),
        "flavour": cfg.flavour,
        "pyc_mode": cfg.pyc_mode,
        "kernel_release": src.kernel_release,
        "packages": src.packages,
        "module_groups": src.module_groups,
        "on_demand_modules": src.on_demand_modules,
        "wheels": [w.name for w in src.wheels],
        "host_files": [str(p) for p in src.host_files],
        "agent_kind": src.agent_kind,
    }
    h.update(json.dumps(desc, sort_keys=True).encode())
    for p in _tree_files(src.agent_dir):
        h.update(str(p.relative_to(src.agent_dir)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


# --- root filesystem -------------------------------------------------------------------------


def _copy_host_file(src: Path, stage: Path) -> None:
    # Libraries and binaries go to their /usr path: the guest root is usr-merged.
    rel = str(src)
    for old in ("/lib/", "/bin/", "/sbin/", "/lib64/"):
        if rel.startswith(old):
            rel = "/usr" + rel
            break
    dest = stage / rel.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)  # follows symlinks: the guest gets the real file under the soname
    mode = src.stat().st_mode
    dest.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def build_root(src: Sources, stage: Path, pyc_mode: str) -> None:
    for d in (
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var",
        "root",
        "mnt",
        "etc",
        "usr/bin",
        "usr/sbin",
        "usr/lib64",
        "usr/lib/python3/dist-packages",
        "newroot",
    ):
        (stage / d).mkdir(parents=True, exist_ok=True)
    for link, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ):
        (stage / link).symlink_to(target)
    for f in src.host_files:
        _copy_host_file(f, stage)
    (stage / "usr/bin/python3").symlink_to(PYTHON)
    # busybox applets for the agent and for debugging; never shadow a real binary.
    applets = _run("busybox applets", ["/bin/busybox", "--list"]).stdout.decode().split()
    for a in applets:
        if (
            a not in ("busybox", "[[")
            and not (stage / "usr/bin" / a).exists()
            and not (stage / "usr/sbin" / a).exists()
        ):
            (stage / "usr/bin" / a).symlink_to("busybox")
    # The kernel runs /sbin/modprobe (kernel.modprobe) to load a module on demand.
    (stage / "usr/sbin/modprobe").symlink_to("../bin/busybox")
    install_modules(src.modules_dir, src.on_demand_modules,
                    stage / "usr/lib/modules" / src.kernel_release)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/os-release").write_text('ID=criserver-guest\nNAME="criserver guest"\n')
    (stage / "etc/hostname").write_text("criserver-guest\n")

    site = stage / "usr/lib/python3/dist-packages"
    _run(
        "install wheels",
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--target",
            str(site),
            *map(str, src.wheels),
        ],
    )
    for p in sorted(site.rglob("*"), reverse=True):
        rel = str(p.relative_to(site))
        if WHEEL_DROP.search(rel) and ".dist-info" not in rel:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(site / "bin", ignore_errors=True)
    # Extension modules ship with symbols (uvloop's is 13 MB): the guest only maps code.
    _run("strip extension modules", ["strip", "--strip-unneeded",
                                     *map(str, sorted(site.rglob("*.so")))])
    build_vmexec(stage / VMEXEC_PATH.lstrip("/"))
    shutil.copytree(
        src.agent_dir,
        site / "vmagent",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"),
    )
    # The root is read-only and Debian ships no .pyc: compile on the host, hash-based so the
    # .pyc stays valid whatever the file mtimes are (erofs gets fixed timestamps); unchecked by
    # default (PYC_MODE): the sources can never change under them.
    _run(
        "compile bytecode",
        [
            f"/usr/bin/{PYTHON}",
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            pyc_mode,
            "-s",
            str(stage),
            "-p",
            "/",
            str(stage / "usr/lib" / PYTHON),
            str(site),
        ],
    )


def _vmexec_toolchain() -> str:
    """What shapes the static vmexec binary besides its source: compiler and static libs."""
    cc = _run("compiler version", [CC, "--version"]).stdout.decode().splitlines()[0]
    libs = _run("static lib versions", ["dpkg-query", "-W", "libc6-dev", "libseccomp-dev"])
    return cc + "; " + " ".join(libs.stdout.decode().split())


def build_vmexec(out: Path) -> None:
    """The agent's exec helper: static (the guest root carries no libseccomp), stripped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(
        "compile vmexec (apt-get install gcc libc6-dev libseccomp-dev)",
        [CC, "-O2", "-Wall", "-Werror", "-static", "-s", "-o", str(out),
         str(GUEST_SRC / VMEXEC_SOURCE), "-lseccomp"],
    )


def make_erofs(stage: Path, out: Path, uuid_seed: str) -> None:
    s = uuid_seed
    uuid = f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:32]}"  # fixed UUID: reproducible image
    # Uncompressed: under TCG decompression costs more guest CPU than reading from page cache.
    _run(
        "make erofs root",
        ["mkfs.erofs", "-T0", "--all-root", "-U", uuid, "-x", "-1", str(out), str(stage)],
    )


# --- initramfs -------------------------------------------------------------------------------


class Cpio:
    """A minimal deterministic newc writer: owner root, mtime 0, device nodes without mknod."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.buf += b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf += name.encode() + b"\0"
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf += b"\0" * (-len(self.buf) % 512)
        return bytes(self.buf)


def build_initramfs(src: Sources) -> bytes:
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "etc", "etc/modgroups", "lib", "lib/modules"):
        c.dir(d)
    # The kernel opens /dev/console before /init runs; devtmpfs is not mounted yet then.
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    for applet in ("sh", "mount", "insmod", "switch_root", "mkdir", "sleep", "reboot", "cat"):
        c.symlink(f"bin/{applet}", "busybox")
    c.file("init", (GUEST_SRC / "init.sh").read_bytes(), 0o755)
    for group, names in sorted(src.module_groups.items()):
        c.file(f"etc/modgroups/{group}", "".join(f"{n}\n" for n in names).encode())
    for name, path in sorted(src.module_files.items()):
        c.file(f"lib/modules/{name}.ko", path.read_bytes())
    # Uncompressed: the kernel only copies it, no decompression on the (slow, emulated) CPU.
    return c.finish()


# --- the build -------------------------------------------------------------------------------


def build(cfg: BuildConfig) -> Path:
    """Build (or reuse) the assets and return the versioned directory `current` points to."""
    t0 = time.monotonic()
    cfg.assets_dir.mkdir(parents=True, exist_ok=True)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    src = resolve_sources(cfg)
    digest = inputs_digest(cfg, src)
    current = cfg.assets_dir / "current"
    if not cfg.force and current.exists():
        try:
            installed = assets_mod.load(cfg.assets_dir)
            if installed.manifest.get("inputs_sha256") == digest:
                installed.verify(full=False)
                log.info("guest assets up to date dir=%s inputs=%s", installed.path, digest[:12])
                return installed.path
        except assets_mod.AssetsError as e:
            log.warning("installed guest assets unusable, rebuilding: %s", e)

    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cfg.assets_dir))
    try:
        out = work / "out"
        out.mkdir()
        log.info("extracting vmlinux kernel=%s", src.kernel_release)
        (out / "vmlinux").write_bytes(extract_vmlinux(src.kernel_image))
        log.info("building initramfs modules=%d", len(src.module_files))
        (out / "initramfs.cpio").write_bytes(build_initramfs(src))
        log.info("building root agent=%s", src.agent_kind)
        stage = work / "root"
        stage.mkdir()
        build_root(src, stage, cfg.pyc_mode)
        make_erofs(stage, out / "root.erofs", digest)
        files = {
            name: {
                "size": (out / name).stat().st_size,
                "sha256": assets_mod.sha256_file(out / name),
            }
            for name in ("vmlinux", "initramfs.cpio", "root.erofs")
        }
        manifest: dict[str, object] = {
            "format": assets_mod.MANIFEST_FORMAT,
            "inputs_sha256": digest,
            "flavour": cfg.flavour,
            "kernel_release": src.kernel_release,
            "kernel": "vmlinux",
            "initramfs": "initramfs.cpio",
            "root": "root.erofs",
            "root_serial": ROOT_SERIAL,
            "agent": src.agent_kind,
            "pyc_mode": cfg.pyc_mode,
            "module_groups": src.module_groups,
            "packages": src.packages,
            "wheels": [w.name for w in src.wheels],
            "files": files,
        }
        # The directory is named by the manifest's content minus the build time, so two builds
        # with identical outputs share one name.
        name = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        manifest["build_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest["build_seconds"] = round(time.monotonic() - t0, 1)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        final = cfg.assets_dir / name
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
        tmp_link = cfg.assets_dir / f".current-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(name)
        tmp_link.replace(current)  # atomic switch: readers see the old or the new set
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("guest assets built dir=%s seconds=%.1f", final, time.monotonic() - t0)
    prune(cfg.assets_dir, cfg.keep)
    return final


def prune(assets_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest versions (never `current`) and stale build dirs.

    Safe for running VMs: QEMU read the kernel and initramfs at start and holds the root image
    open, so removing the files does not touch it.
    """
    current = (assets_dir / "current").resolve()
    versions = sorted(
        (p for p in assets_dir.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name) and p.is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    kept = [current]
    for v in versions:
        if v == current:
            continue
        if len(kept) < keep:
            kept.append(v)
            continue
        log.info("removing old guest assets dir=%s", v)
        shutil.rmtree(v, ignore_errors=True)
    for stale in assets_dir.glob(".build-*"):
        # An interrupted build; an hour is far longer than any build takes.
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.build", description=__doc__)
    ap.add_argument("--assets-dir", type=Path, default=assets_mod.DEFAULT_ASSETS_DIR)
    ap.add_argument("--flavour", choices=("amd64", "cloud"), default="amd64")
    ap.add_argument("--kernel-release", help="e.g. 6.1.0-56-amd64 (default: newest installed)")
    ap.add_argument("--cache-dir", type=Path, default=BuildConfig.cache_dir)
    ap.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    ap.add_argument("--keep", type=int, default=2, help="versions to keep, current included")
    ap.add_argument(
        "--pyc-mode", choices=("checked-hash", "unchecked-hash", "timestamp"), default=PYC_MODE
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = BuildConfig(
        assets_dir=args.assets_dir,
        flavour=args.flavour,
        kernel_release=args.kernel_release,
        cache_dir=args.cache_dir,
        force=args.force,
        pyc_mode=args.pyc_mode,
        keep=max(1, args.keep),
    )
    try:
        path = build(cfg)
    except BuildError as e:
        log.error("guest build failed: %s", e)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
