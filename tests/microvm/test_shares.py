"""Pod volumes on the host: read-only and recursively read-only binds are enforced on the host
(critest "readonly mounts": a tmpfs below a read-only volume stays writable unless the mount is
recursively read-only), and the guest is told where the host's mounts below a volume are."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver.backends.microvm.shares import (
    GUEST_VOLUMES_DIR,
    PodVolumes,
    Submount,
    Volume,
    with_submounts,
)
from criserver.errors import InvalidArgument

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def host_path(tmp_path: Path) -> Iterator[Path]:
    """A directory with a tmpfs mounted below it, as critest's createHostPathForRROMount."""
    source = tmp_path / "src"
    (source / "tmpfs").mkdir(parents=True)
    (source / "ro-tmpfs").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(source / "tmpfs")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "none", str(source / "ro-tmpfs")],
                   check=True)
    yield source
    for sub in ("tmpfs", "ro-tmpfs"):
        subprocess.run(["umount", "-l", str(source / sub)], check=False)


def writable(path: Path) -> bool:
    try:
        (path / "probe").write_text("x")
    except OSError as exc:
        assert exc.errno == errno.EROFS, exc
        return False
    (path / "probe").unlink()
    return True


def host_side(volumes: PodVolumes, volume: Volume) -> Path:
    return volumes.directory / volume.guest_path.removeprefix(GUEST_VOLUMES_DIR + "/")


def moved(volumes: PodVolumes, volume: Volume, rel: str) -> Path:
    """Where the copy of the host's mount point `rel` below `volume` is mounted now."""
    sub = next(m for m in volume.submounts if m.path == rel)
    return volumes.directory / sub.guest_source.removeprefix(GUEST_VOLUMES_DIR + "/")


@needs_root
async def test_modes_are_enforced_on_the_host(volumes: PodVolumes, host_path: Path) -> None:
    rw = await volumes.bind("c1", str(host_path), "rw")
    ro = await volumes.bind("c1", str(host_path), "ro")
    rro = await volumes.bind("c1", str(host_path), "rro")
    assert len({rw.guest_path, ro.guest_path, rro.guest_path}) == 3  # one bind per mode
    assert writable(host_side(volumes, rw)) and writable(moved(volumes, rw, "tmpfs"))
    # ro: only the top, as runc's "ro" (critest "should support non-recursive readonly mounts")
    assert not writable(host_side(volumes, ro))
    assert writable(moved(volumes, ro, "tmpfs"))
    assert not writable(moved(volumes, ro, "ro-tmpfs"))
    # rro: everything below too (critest "should support recursive readonly mounts")
    assert not writable(host_side(volumes, rro))
    assert not writable(moved(volumes, rro, "tmpfs"))
    assert writable(host_path) and writable(host_path / "tmpfs")  # the source is untouched
    # The guest sees one 9p file system: it gets the mount points below as binds of their own,
    # moved out of the volume's bind.
    assert {m.path: m.read_only for m in ro.submounts} == {"tmpfs": False, "ro-tmpfs": True}
    assert {m.path: m.read_only for m in rw.submounts} == {"tmpfs": False, "ro-tmpfs": True}
    assert {m.path: m.read_only for m in rro.submounts} == {"tmpfs": True, "ro-tmpfs": True}
    assert not list((host_side(volumes, ro) / "tmpfs").iterdir())  # the host's bare directory
    again = await volumes.bind("c1", str(host_path), "ro")  # a retry: same bind, still ro
    assert again == ro and not writable(host_side(volumes, ro))
    await volumes.release("c1")
    assert list(volumes.directory.iterdir()) == []


@needs_root
async def test_the_host_can_remove_a_mount_point_below_a_bound_volume(
        volumes: PodVolumes, host_path: Path) -> None:
    """critest unmounts its tmpfs below a read-only volume and removes the directory while
    the container runs: no copy of ours may stay mounted on that directory."""
    await volumes.bind("c1", str(host_path), "ro")
    await volumes.bind("c1", str(host_path), "rw")
    subprocess.run(["umount", "-l", str(host_path / "tmpfs")], check=True)
    (host_path / "tmpfs").rmdir()
    await volumes.release("c1")


@needs_root
async def test_bind_refuses_unknown_modes(volumes: PodVolumes, host_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        await volumes.bind("c1", str(host_path), "rw,ro")


def test_with_submounts_binds_the_host_mounts_below_a_volume() -> None:
    aside = f"{GUEST_VOLUMES_DIR}/v1-ro.m0"
    vol = Volume(f"{GUEST_VOLUMES_DIR}/v1-ro", (Submount("tmpfs", False, aside),
                                                Submount("tmpfs/in", True, f"{aside}/in")))
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/mnt/", "type": "bind", "source": vol.guest_path,
         "options": ["rbind", "rprivate", "ro"]},
        {"destination": "/mnt/tmpfs/x", "type": "bind", "source": "/elsewhere",
         "options": ["rbind", "rprivate", "rw"]},
    ]
    out = with_submounts(mounts, {vol.guest_path: vol})
    assert out == [
        mounts[0], mounts[1],
        {"destination": "/mnt/tmpfs", "type": "bind", "source": aside,
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/mnt/tmpfs/in", "type": "bind",
         "source": f"{aside}/in", "options": ["rbind", "rprivate", "ro"]},
        mounts[2],  # the CRI's own deeper mount still comes last
    ]
    assert with_submounts(mounts, {}) == mounts
