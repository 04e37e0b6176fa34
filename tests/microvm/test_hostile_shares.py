"""What a guest writes into its read-write 9p share (the pod's volumes directory on the host,
/run/criserver/shared in the guest) never makes the host daemon follow it out of the share or
block on it: symlinks named like volumes, fifos, a huge file, a hard link, where the daemon
creates, mounts, unmounts and removes its volume mount points."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver.backends.microvm import shares
from criserver.backends.microvm.shares import PodVolumes
from criserver.errors import FailedPrecondition

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
CID = "c" * 64


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def host_mount(tmp_path: Path) -> Iterator[Path]:
    """A host mount outside the share: what a guest's symlink points the daemon at."""
    path = tmp_path / "host-mount"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(path)], check=True)
    (path / "data").write_text("host")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_symlink_named_like_a_volume_is_not_unmounted_through(
        volumes: PodVolumes, host_mount: Path) -> None:
    # Before: the release resolved the link, saw a mount point and detached the host's mount.
    (volumes.directory / f"{CID[:16]}-evil").symlink_to(host_mount)
    (volumes.directory / f"{CID[:16]}-evil.m0").symlink_to(host_mount)
    await volumes.release(CID)
    assert mounted(host_mount)
    assert (host_mount / "data").read_text() == "host"
    assert not any(volumes.directory.iterdir())  # the links themselves are gone
    (volumes.directory / "x").symlink_to(host_mount)
    await volumes.remove_all()
    assert mounted(host_mount)


async def test_fifos_and_huge_files_in_the_share_do_not_block_the_release(
        volumes: PodVolumes) -> None:
    os.mkfifo(volumes.directory / f"{CID[:16]}-fifo")
    with open(volumes.directory / f"{CID[:16]}-huge", "wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB to whoever reads it
    outside = volumes.directory.parent / "outside"  # a hard link cannot cross the bind
    outside.write_text("host")
    os.link(outside, volumes.directory / f"{CID[:16]}-hard")
    await asyncio.wait_for(volumes.release(CID), 5)
    assert not any(volumes.directory.iterdir())
    assert outside.read_text() == "host"


@pytest.mark.parametrize("kind", ["dir", "file"])
async def test_a_symlink_swapped_in_for_a_mount_point_is_refused(
        volumes: PodVolumes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    # The guest wins the race between the release of an old mount point and the new bind.
    source = tmp_path / "src"
    if kind == "dir":
        source.mkdir()
    else:
        source.write_text("volume")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = volumes.name_for(CID, str(source))
    monkeypatch.setattr(volumes, "_release_exact", lambda name: None)
    (volumes.directory / name).symlink_to(elsewhere if kind == "dir" else elsewhere / "new")
    with pytest.raises(FailedPrecondition, match="made by the guest"):
        await volumes.bind(CID, str(source))
    assert not mounted(elsewhere)
    assert not any(elsewhere.iterdir())  # no file created through a dangling link


def test_mount_refuses_a_symlink_target(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OSError, match="symlink"):
        shares._mount(tmp_path, tmp_path / "link", shares._MS_BIND)
    assert not mounted(tmp_path)
