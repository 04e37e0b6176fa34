"""The image store out of space during a pull (issue 18): the daemon's `<root>/image` on a small
loop filesystem, nearly filled, and an image from the real registry that does not fit. The pull
must fail RESOURCE_EXHAUSTED (as containerd and CRI-O answer) naming the store, leave no temp
file, blob, snapshot or record, the daemon must keep serving, and once space is freed the same
pull must work. Run out at each stage: the layer download, the unpack, the EROFS build."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from tests.cri_client import CRIClient, msg
from tests.daemon import Daemon
from tests.image.oci import E, Image, Layer, Pusher, tar_bytes
from tests.loopfs import fill, free_bytes, loop_fs, unfill
from tests.registry import Registry

pytestmark = [
    pytest.mark.registry,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a loop filesystem: needs root"),
]

MIB = 1024 * 1024
LAYER = 8 * MIB  # random bytes: the blob, the unpacked file and the EROFS each take this much


@pytest.fixture(scope="module")
async def big_ref(registry: Registry) -> str:
    image = Image([Layer(tar_bytes([E("big", data=os.urandom(LAYER))]), "")])
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("full/big", "v1", image)
    return f"{registry.host}/full/big:v1"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Path]]:
    (tmp_path / "d").mkdir()
    daemon = Daemon(tmp_path / "d")
    images = daemon.root / "image"
    with loop_fs(images, 64, tmp_path / "images.ext4"):
        daemon.start()
        try:
            yield daemon, images
        finally:
            daemon.kill()


def _leftovers(images: Path) -> list[str]:
    """Everything in the image store but the ballast and ext4's own directory."""
    return sorted(str(p.relative_to(images)) for p in images.rglob("*")
                  if p.is_file() and p.name != ".ballast" and "lost+found" not in p.parts)


async def _pull(cri: CRIClient, ref: str) -> str:
    reply = await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=ref)))
    return str(reply.image_ref)


# Free space left before the pull: the blob does not fit; the blob fits, its unpacked tree does
# not; blob and tree fit, the EROFS image does not.
STAGES = {"download": LAYER // 2, "unpack": LAYER * 3 // 2, "mkfs": LAYER * 5 // 2}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_a_pull_that_does_not_fit_is_resource_exhausted_and_leaves_nothing(
        store: tuple[Daemon, Path], big_ref: str, stage: str) -> None:
    daemon, images = store
    cri = daemon.client()
    try:
        fill(images, leave=STAGES[stage])
        before = _leftovers(images)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _pull(cri, big_ref)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "no space left" in (err.value.details() or "").lower()
        assert str(images) in (err.value.details() or "")
        # Serving, and nothing of the pull kept: no temp file, blob, snapshot or record.
        assert daemon.process is not None and daemon.process.poll() is None
        assert (await cri.runtime.Version(msg("VersionRequest"))).runtime_name == "criserver"
        assert list((await cri.image.ListImages(msg("ListImagesRequest"))).images) == []
        assert _leftovers(images) == before
        status = await cri.image.ImageStatus(msg("ImageStatusRequest",
                                                 image=msg("ImageSpec", image=big_ref)))
        assert not status.HasField("image")

        unfill(images)
        assert free_bytes(images) > 3 * LAYER
        image_id = await _pull(cri, big_ref)
        listed = (await cri.image.ListImages(msg("ListImagesRequest"))).images
        assert [i.id for i in listed] == [image_id]
        assert not [p for p in _leftovers(images) if ".tmp-" in p]
    finally:
        await cri.close()
