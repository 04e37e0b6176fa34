"""Image and container rootfs mounts with real EROFS files, loop devices and overlays (root)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver.backends.runc import rootfs
from criserver.errors import FailedPrecondition
from vmagent import mountutil

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def mounts_under(directory: Path) -> list[str]:
    base = os.path.realpath(directory)
    return [p for p in rootfs._mount_points() if p == base or p.startswith(base + "/")]


def mount_count(path: Path) -> int:
    return rootfs._mounts_on(path)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        pytest.skip("mkfs.erofs (erofs-utils) is not installed")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hello").write_text("from the image\n")
    out = tmp_path / "image.erofs"
    subprocess.run([mkfs, "--quiet", str(out), str(src)], check=True)
    return out


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose every mount (the shared binds too) is gone after the test."""
    directory = tmp_path / "state"
    directory.mkdir()
    try:
        yield directory
    finally:
        for point in reversed(mounts_under(directory)):
            mountutil.umount(point, mountutil.MNT_DETACH)
        rootfs._shared.difference_update(
            {p for p in rootfs._shared if str(p).startswith(str(directory))})


async def test_acquire_twice_mounts_once_and_last_release_unmounts(
        image: Path, state: Path) -> None:
    mounts = rootfs.ImageMounts(state / "images")
    first, second = await asyncio.gather(mounts.acquire("abc", image),
                                         mounts.acquire("abc", image))
    assert first == second == state / "images" / "abc"
    assert mount_count(first) == 1
    assert mounts.users("abc") == 2
    assert (first / "etc" / "hello").read_text() == "from the image\n"
    with pytest.raises(OSError) as info:
        (first / "new").write_text("x")
    assert info.value.errno == errno.EROFS

    await mounts.release("abc")
    assert mount_count(first) == 1
    await mounts.release("abc")
    assert mount_count(first) == 0
    assert not first.exists()
    await mounts.release("abc")  # no user left: nothing to do


async def test_mounts_directory_is_a_shared_mount(image: Path, state: Path) -> None:
    mounts = rootfs.ImageMounts(state / "images")
    await mounts.acquire("abc", image)
    base = os.path.realpath(state / "images")
    with open("/proc/self/mountinfo") as f:
        lines = [line.split(" - ")[0].split() for line in f]
    own = [fields for fields in lines if fields[4] == base]
    assert own and any(opt.startswith("shared:") for opt in own[-1][6:])
    await mounts.release("abc")


async def test_overlay_reads_the_image_and_writes_the_upper(image: Path, state: Path,
                                                            tmp_path: Path) -> None:
    mounts = rootfs.ImageMounts(state / "images")
    lower = await mounts.acquire("abc", image)
    ctr = tmp_path / "containers" / "c1"
    target = state / "containers" / "c1"
    await rootfs.mount_container_rootfs(lower, ctr / "upper", ctr / "work", target)
    assert mount_count(target) == 1
    assert (target / "etc" / "hello").read_text() == "from the image\n"
    (target / "etc" / "written").write_text("by the container\n" * 1000)
    assert (ctr / "upper" / "etc" / "written").read_text().startswith("by the container")
    assert not (lower / "etc" / "written").exists()
    assert rootfs.writable_layer_bytes(ctr / "upper") >= 17000

    await rootfs.unmount(target)
    assert mount_count(target) == 0
    assert not target.exists()
    await rootfs.unmount(target)  # idempotent
    await rootfs.remove_tree(ctr)
    assert not ctr.exists()
    await mounts.release("abc")
    assert mount_count(lower) == 0


async def test_unmount_of_a_busy_overlay_detaches_it(image: Path, state: Path,
                                                     tmp_path: Path) -> None:
    mounts = rootfs.ImageMounts(state / "images")
    lower = await mounts.acquire("abc", image)
    target = state / "containers" / "c1"
    await rootfs.mount_container_rootfs(lower, tmp_path / "u", tmp_path / "w", target)
    fd = os.open(target / "etc", os.O_RDONLY)  # a straggler keeps it busy
    try:
        await rootfs.unmount(target)
        assert mount_count(target) == 0
    finally:
        os.close(fd)
    await mounts.release("abc")


async def test_recover_unmounts_what_nobody_uses_and_adopts_the_rest(
        image: Path, state: Path) -> None:
    before = rootfs.ImageMounts(state / "images")
    stale = await before.acquire("stale", image)
    kept = await before.acquire("kept", image)
    (state / "images" / "empty").mkdir()  # a leftover directory without a mount

    after = rootfs.ImageMounts(state / "images")  # the daemon restarted
    await after.recover({"kept": 1, "gone": 0})
    assert mount_count(stale) == 0 and not stale.exists()
    assert not (state / "images" / "empty").exists()
    assert mount_count(kept) == 1
    assert after.users("kept") == 1

    assert await after.acquire("kept", image) == kept
    assert mount_count(kept) == 1  # adopted, not mounted twice
    await after.release("kept")
    await after.release("kept")
    assert mount_count(kept) == 0


async def test_recover_remounts_a_missing_image_mount_lazily(image: Path, state: Path) -> None:
    mounts = rootfs.ImageMounts(state / "images")
    await mounts.recover({"abc": 1})
    target = state / "images" / "abc"
    assert mount_count(target) == 0
    assert await mounts.ensure_mounted("abc", image) == target
    assert mount_count(target) == 1
    assert mounts.users("abc") == 1
    await mounts.release("abc")
    assert mount_count(target) == 0


async def test_loop_device_fallback_when_the_kernel_wants_a_block_device(
        image: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = mountutil.mount

    def no_file_backed(source: str, target: str, fstype: str, flags: int = 0,
                       data: str = "") -> None:
        if fstype == "erofs":  # as Linux < 6.12 answers
            raise OSError(errno.ENOTBLK, "Block device required")
        real(source, target, fstype, flags, data)

    monkeypatch.setattr(mountutil, "mount", no_file_backed)
    mounts = rootfs.ImageMounts(state / "images")
    target = await mounts.acquire("abc", image)
    assert (target / "etc" / "hello").read_text() == "from the image\n"
    with open("/proc/self/mountinfo") as f:
        source = next(line.split(" - ")[1].split()[1] for line in f
                      if line.split()[4] == os.path.realpath(target))
    assert source.startswith("/dev/loop")
    await mounts.release("abc")
    assert mount_count(target) == 0
    # autoclear: the device lets go of the file once unmounted
    listed = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert listed.stdout.strip() == ""


async def test_a_bad_image_file_is_a_clear_failed_precondition(state: Path,
                                                                tmp_path: Path) -> None:
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(b"not an erofs image" * 1000)
    mounts = rootfs.ImageMounts(state / "images")
    with pytest.raises(FailedPrecondition) as info:
        await mounts.acquire("bad", bad)
    assert str(bad) in info.value.message and "EROFS" in info.value.message
    assert "exited" in info.value.message  # the mount tool's answer is in it
    assert not (state / "images" / "bad").exists()
    assert mounts.users("bad") == 0

    with pytest.raises(FailedPrecondition, match="missing"):
        await mounts.acquire("gone", tmp_path / "gone.erofs")
