"""The guest asset build (real Debian inputs, real mkfs.erofs) and the installed-assets checks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from criserver.vm import assets as assets_mod
from guest import build as guestbuild

KERNELS = sorted(Path("/boot").glob("vmlinuz-*"))


def _cpio_names(data: bytes) -> dict[str, int]:
    """name -> mode of every entry of a newc archive."""
    out: dict[str, int] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        if name == "TRAILER!!!":
            return out
        out[name] = mode
        pos = name_start + namesize
        pos += -pos % 4
        pos += filesize
        pos += -pos % 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> assets_mod.GuestAssets:
    d = tmp_path_factory.mktemp("assets")
    try:
        guestbuild.build(guestbuild.BuildConfig(assets_dir=d))
    except guestbuild.BuildError as e:
        pytest.skip(f"guest build impossible here: {e}")
    return assets_mod.load(d)


def test_build_layout_and_manifest(built: assets_mod.GuestAssets) -> None:
    m = built.manifest
    assert (built.path.parent / "current").resolve() == built.path
    assert len(built.version) == 64
    assert built.kernel.read_bytes()[:4] == b"\x7fELF"
    assert m["kernel_release"].endswith("-amd64")
    assert {"vmlinux", "initramfs.cpio", "root.erofs"} == set(m["files"])
    for pkg in ("busybox-static", "runc", "libc6"):
        assert pkg in m["packages"], pkg
    assert any(p.startswith("python3.11") or p.startswith("libpython3.11") for p in m["packages"])
    assert any(w.startswith("grpclib-0.4.9") for w in m["wheels"])
    assert any(w.startswith("protobuf-7.36.2") for w in m["wheels"])
    assert {"core", "mmio", "pci", "serial"} <= set(m["module_groups"])
    assert m["agent"] in ("vmagent", "standin")
    built.verify(full=True)


def test_initramfs_has_init_modules_and_console(built: assets_mod.GuestAssets) -> None:
    names = _cpio_names(built.initramfs.read_bytes())
    assert "init" in names and names["init"] & 0o111
    assert "bin/busybox" in names
    assert "dev/console" in names and (names["dev/console"] & 0o170000) == 0o020000
    for group, mods in built.manifest["module_groups"].items():
        assert f"etc/modgroups/{group}" in names
        for mod in mods:
            assert f"lib/modules/{mod}.ko" in names


def test_module_groups_list_dependencies_first(built: assets_mod.GuestAssets) -> None:
    deps: dict[str, set[str]] = {}
    mod_dir = Path("/lib/modules") / built.kernel_release
    for line in (mod_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        key = Path(target).name[:-3].replace("-", "_")
        deps[key] = {Path(d).name[:-3].replace("-", "_") for d in rest.split()}
    for group, mods in built.manifest["module_groups"].items():
        for i, mod in enumerate(mods):
            assert deps[mod] <= set(mods[:i]), f"{group}: {mod} loaded before its deps"
    # libcrc32c's soft dependency resolves to the portable implementation.
    core = built.manifest["module_groups"]["core"]
    assert "crc32c_generic" in core and "crc32c_intel" not in core


def test_second_build_is_skipped(
    built: assets_mod.GuestAssets, caplog: pytest.LogCaptureFixture
) -> None:
    mtime = built.root.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="criserver.guestbuild"):
        again = guestbuild.build(guestbuild.BuildConfig(assets_dir=built.path.parent))
    assert again == built.path
    assert built.root.stat().st_mtime_ns == mtime
    assert "up to date" in caplog.text


def test_verify_detects_corruption(built: assets_mod.GuestAssets, tmp_path: Path) -> None:
    copy = tmp_path / built.version
    shutil.copytree(built.path, copy)
    (tmp_path / "current").symlink_to(built.version)
    a = assets_mod.load(tmp_path)
    a.verify()
    with (copy / "initramfs.cpio").open("r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    a.verify(full=False)  # same size: only the hash sees it
    with pytest.raises(assets_mod.AssetsError, match=r"initramfs\.cpio"):
        a.verify()
    with (copy / "root.erofs").open("ab") as f:
        f.write(b"x")
    with pytest.raises(assets_mod.AssetsError, match=r"root\.erofs has size"):
        a.verify(full=False)
    (copy / "root.erofs").unlink()
    with pytest.raises(assets_mod.AssetsError, match=r"root\.erofs is missing"):
        a.verify(full=False)


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(assets_mod.AssetsError, match="make guest"):
        assets_mod.load(tmp_path / "nowhere")
    (tmp_path / "v1").mkdir()
    (tmp_path / "current").symlink_to("v1")
    with pytest.raises(assets_mod.AssetsError, match=r"manifest\.json is missing"):
        assets_mod.load(tmp_path)
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(assets_mod.AssetsError, match="format"):
        assets_mod.load(tmp_path)


@pytest.mark.skipif(not KERNELS, reason="no Debian kernel in /boot")
@pytest.mark.parametrize("bzimage", KERNELS, ids=lambda p: p.name)
def test_extract_vmlinux_has_pvh_entry(bzimage: Path) -> None:
    elf = guestbuild.extract_vmlinux(bzimage)
    assert elf[:4] == b"\x7fELF"
    # QEMU boots a vmlinux through its Xen PVH note (type 18, XEN_ELFNOTE_PHYS32_ENTRY).
    assert re.search(rb"\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00", elf)


def test_build_is_reproducible(built: assets_mod.GuestAssets, tmp_path: Path) -> None:
    again = guestbuild.build(guestbuild.BuildConfig(assets_dir=tmp_path))
    other = assets_mod.load(tmp_path)
    assert again.name == built.version
    assert other.manifest["files"] == built.manifest["files"]


def test_prune_keeps_current_and_newest(tmp_path: Path) -> None:
    names = [f"{i:064x}" for i in range(4)]
    for age, name in enumerate(names):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 - age, 1000 - age))  # names[0] is the newest
    (tmp_path / "current").symlink_to(names[3])  # current is the oldest: must survive anyway
    guestbuild.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[3], "current"])
