"""Machine disk files with the real qemu-img: empty and copy-on-write disks, bases made once per
image, growth, the refusals (shrinking, smaller than the image, hostile qcow2s), removal and the
bases' lifetime."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from criserver.errors import FailedPrecondition, InvalidArgument, NotFound
from criserver.vm import disks

MiB = 1 << 20


def qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, object] = json.loads(out)
    return info


def raw_image(path: Path, size: int = 4 * MiB, marker: bytes = b"os-image-bytes") -> Path:
    with open(path, "wb") as f:
        f.write(marker)
        f.truncate(size)
    return path


def guest_view(disk: Path, length: int) -> bytes:
    """The first bytes the guest sees of `disk` (through its backing chain)."""
    flat = disk.with_name(disk.name + ".flat")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(flat)],
                   check=True)
    try:
        with open(flat, "rb") as f:
            return f.read(length)
    finally:
        flat.unlink()


async def test_empty_disk(tmp_path: Path) -> None:
    disk = tmp_path / "m1" / "data.qcow2"
    made = await disks.create(disk, 64 * MiB)
    assert made == disks.DiskImage(disk, "qcow2", 64 * MiB, "")
    info = qemu_img_info(disk)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MiB
    assert "backing-filename" not in info
    assert disk.stat().st_size < MiB  # sparse: nothing written yet
    assert [p.name for p in disk.parent.iterdir()] == ["data.qcow2"]  # no temp file left


async def test_disk_over_a_base_made_once(tmp_path: Path) -> None:
    blob = raw_image(tmp_path / "blob")
    bases = disks.Bases(tmp_path / "bases")
    # Concurrent machines from one image share one base.
    made = await asyncio.gather(*(bases.ensure("abc123", blob) for _ in range(3)))
    base = made[0]
    assert all(b == base for b in made)
    assert base == disks.Base("abc123", tmp_path / "bases" / "abc123.raw", "raw", 4 * MiB)
    assert base.path.stat().st_ino == blob.stat().st_ino  # hard-linked, not copied
    disk = tmp_path / "m1" / "root.qcow2"
    await disks.create(disk, 16 * MiB, base)
    info = qemu_img_info(disk)
    assert info["virtual-size"] == 16 * MiB
    assert info["backing-filename"] == str(base.path.resolve())
    assert info["backing-filename-format"] == "raw"
    assert guest_view(disk, 14) == b"os-image-bytes"
    # Again (a retried create): the same file, untouched.
    before = disk.stat().st_mtime_ns
    assert (await disks.create(disk, 16 * MiB, base)).virtual_size == 16 * MiB
    assert disk.stat().st_mtime_ns == before
    # A second ensure finds the base made before (e.g. after a restart).
    assert await disks.Bases(tmp_path / "bases").ensure("abc123", blob) == base


async def test_qcow2_image_as_base(tmp_path: Path) -> None:
    raw = raw_image(tmp_path / "raw", 8 * MiB)
    blob = tmp_path / "blob"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(blob)],
                   check=True)
    base = await disks.Bases(tmp_path / "bases").ensure("q", blob)
    assert (base.format, base.virtual_size) == ("qcow2", 8 * MiB)
    disk = tmp_path / "root.qcow2"
    await disks.create(disk, 8 * MiB, base)
    assert qemu_img_info(disk)["backing-filename-format"] == "qcow2"
    assert guest_view(disk, 14) == b"os-image-bytes"


async def test_sizes_are_checked(tmp_path: Path) -> None:
    base = await disks.Bases(tmp_path / "bases").ensure("k", raw_image(tmp_path / "blob"))
    with pytest.raises(InvalidArgument, match="smaller than its image"):
        await disks.create(tmp_path / "small.qcow2", 2 * MiB, base)
    with pytest.raises(InvalidArgument, match="must be positive"):
        await disks.create(tmp_path / "zero.qcow2", 0)
    with pytest.raises(InvalidArgument, match="beyond the limit"):
        await disks.create(tmp_path / "huge.qcow2", disks.MAX_DISK_BYTES + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bases", "blob"]


async def test_hostile_disk_images_are_refused(tmp_path: Path) -> None:
    bases = disks.Bases(tmp_path / "bases")
    secret = raw_image(tmp_path / "host-secret", MiB, b"host secret")
    # A qcow2 whose backing file is a host file: the guest would read it.
    sneaky = tmp_path / "sneaky"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    str(sneaky)], check=True)
    with pytest.raises(InvalidArgument, match="backing file"):
        await bases.ensure("sneaky", sneaky)
    # A format QEMU reads but disks are not made from (vmdk descriptors may name host files).
    vmdk = tmp_path / "img.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    with pytest.raises(InvalidArgument, match="format 'vmdk' is not supported"):
        await bases.ensure("vmdk", vmdk)
    with pytest.raises(InvalidArgument, match="not a plain name"):
        await bases.ensure("../x", secret)
    assert not (tmp_path / "bases").exists() or list((tmp_path / "bases").iterdir()) == []


async def test_resize(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    await disks.create(disk, 16 * MiB)
    grown = await disks.resize(disk, 32 * MiB)
    assert grown.virtual_size == 32 * MiB == qemu_img_info(disk)["virtual-size"]
    assert (await disks.resize(disk, 32 * MiB)).virtual_size == 32 * MiB  # same: no change
    with pytest.raises(InvalidArgument, match="cannot shrink"):
        await disks.resize(disk, 16 * MiB)
    with pytest.raises(NotFound):
        await disks.resize(tmp_path / "missing.qcow2", 16 * MiB)


async def test_remove_and_base_lifetime(tmp_path: Path) -> None:
    bases = disks.Bases(tmp_path / "bases")
    base_a = await bases.ensure("a", raw_image(tmp_path / "blob-a"))
    base_b = await bases.ensure("b", raw_image(tmp_path / "blob-b"))
    disk = tmp_path / "m1" / "root.qcow2"
    await disks.create(disk, 8 * MiB, base_a)
    # Image b is gone and no disk uses its base; a's image is gone but a disk still uses it.
    assert await bases.prune([disk], keep=[]) == ["b"]
    assert base_a.path.exists() and not base_b.path.exists()
    # While the image is present its base stays even without disks.
    assert await bases.prune([], keep=["a"]) == []
    await disks.remove(disk)
    await disks.remove(disk)  # already gone: no error
    assert await bases.prune([disk], keep=[]) == ["a"]
    assert list((tmp_path / "bases").iterdir()) == []


async def test_resize_refuses_a_disk_held_open(tmp_path: Path) -> None:
    """A process holding the disk's write lock (a running VM; here qemu-nbd) makes the
    file-level resize fail clearly: a running VM's disk grows over QMP."""
    disk = tmp_path / "held.qcow2"
    await disks.create(disk, 16 * MiB)
    holder = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--persistent",
                               "-k", str(tmp_path / "nbd.sock"), str(disk)])
    try:
        for _ in range(100):
            if (tmp_path / "nbd.sock").exists():
                break
            await asyncio.sleep(0.05)
        with pytest.raises(FailedPrecondition, match="in use by a running VM"):
            await disks.resize(disk, 32 * MiB)
        assert (await disks.inspect(disk, "qcow2")).virtual_size == 16 * MiB
    finally:
        holder.kill()
        holder.wait()
