"""Image volumes as the agent makes them, on the host (root, loop devices, EROFS): the image
file loop-mounted once and shared with rootfs users, the (sub)path bound read-only, missing
sub paths refused, and everything undone on unmount."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.vmagent.containerkit import make_erofs
from vmagent import mountutil
from vmagent.api import agent_pb2 as pb
from vmagent.imagevolumes import mount_volume, unmount_volume
from vmagent.rootfs import Mounts


def _can_loop_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mkfs.erofs") is None:
        return False
    with open("/proc/filesystems") as f:
        return "erofs" in f.read()


pytestmark = pytest.mark.skipif(not _can_loop_mount(),
                                reason="needs root, mkfs.erofs and erofs in the kernel")


@pytest.fixture
def image(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "root"
    (root / "usr/etc").mkdir(parents=True)
    (root / "usr/etc/passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (root / "etc").symlink_to("/usr/etc")  # absolute: must resolve inside the image
    (root / "bin").mkdir()
    (root / "bin/tool").write_text("#!/bin/sh\n")
    images = tmp_path / "images"
    images.mkdir()
    yield str(images / make_erofs(root, images))


async def test_image_volume_sub_path_bound_read_only(image: str, tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    mounts = Mounts(run_dir)
    whole = pb.Mount(type="erofs", source=image, target=f"{run_dir}/imagevolumes/c1/0")
    etc = pb.Mount(type="erofs", source=image, target=f"{run_dir}/imagevolumes/c1/1",
                   sub_path="etc")
    tool = pb.Mount(type="erofs", source=image, target=f"{run_dir}/imagevolumes/c1/2",
                    sub_path="bin/tool")
    volumes = []
    try:
        for m in (whole, etc, tool):
            volumes.append(await mount_volume(mounts, m, "c1"))
        assert sorted(os.listdir(whole.target)) == ["bin", "etc", "usr"]
        assert os.listdir(etc.target) == ["passwd"]  # the image's /usr/etc, not the host's
        assert Path(tool.target).read_text() == "#!/bin/sh\n"
        with pytest.raises(OSError):
            Path(etc.target, "new").write_text("x")  # read-only
        # The image itself is mounted once for all three.
        image_mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                        if f"{run_dir}/imagefs/" in line]
        assert len(image_mounts) == 1
    finally:
        for volume in volumes:
            await unmount_volume(mounts, volume)
    assert not mountutil.is_mountpoint(etc.target)
    assert not os.path.exists(f"{run_dir}/imagevolumes/c1")
    # The image stays mounted with no user, for the next container of it; then it goes.
    assert len(_mounts_under(run_dir)) == 1
    again = await mount_volume(mounts, whole, "c2")
    assert sorted(os.listdir(whole.target)) == ["bin", "etc", "usr"]
    assert len(_mounts_under(f"{run_dir}/imagefs/")) == 1
    await unmount_volume(mounts, again)
    await mounts.unmount_unused()
    assert not _mounts_under(run_dir)


def _mounts_under(prefix: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if prefix in line]


@pytest.mark.parametrize("sub_path", ["missing", "bin/tool/below"])
async def test_image_volume_missing_sub_path(image: str, tmp_path: Path, sub_path: str) -> None:
    run_dir = str(tmp_path / "run")
    mounts = Mounts(run_dir)
    m = pb.Mount(type="erofs", source=image, target=f"{run_dir}/imagevolumes/c1/0",
                 sub_path=sub_path)
    with pytest.raises(GRPCError) as err:
        await mount_volume(mounts, m, "c1")
    assert err.value.status is Status.NOT_FOUND and sub_path in str(err.value.message)
    # The image mount made for it is released again: unused, it goes with unmount_unused.
    await mounts.unmount_unused()
    assert not _mounts_under(run_dir)


@pytest.mark.parametrize("target", ["/etc/x", "{run}/../etc", "relative"])
async def test_image_volume_target_under_run_dir(image: str, tmp_path: Path,
                                                 target: str) -> None:
    run_dir = str(tmp_path / "run")
    m = pb.Mount(type="erofs", source=image, target=target.format(run=run_dir))
    with pytest.raises(GRPCError) as err:
        await mount_volume(Mounts(run_dir), m, "c1")
    assert err.value.status is Status.INVALID_ARGUMENT
