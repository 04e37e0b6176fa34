"""CRI ImageService semantics through the servicer, against the real registry: ids that agree,
filters, removal by tag/id/digest, idempotence, in-use protection, pinning, fs usage, restart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from criserver.api.runtime.v1 import api_pb2
from criserver.errors import InvalidArgument
from criserver.image import ImageService
from criserver.image.servicer import image_service
from tests.image.conftest import Pushed, ServiceFactory

pytestmark = pytest.mark.registry


def spec(image: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=image)


Servicer = dict[str, Any]  # the ImageService table the daemon registers


async def pull(servicer: Servicer, image: str) -> str:
    resp = await servicer["PullImage"](api_pb2.PullImageRequest(image=spec(image)))
    return str(resp.image_ref)


async def status(servicer: Servicer, image: str, verbose: bool = False) -> Any:
    return await servicer["ImageStatus"](api_pb2.ImageStatusRequest(image=spec(image),
                                                                 verbose=verbose))


async def listed(servicer: Servicer, image: str = "") -> list[str]:
    req = api_pb2.ListImagesRequest()
    if image:
        req.filter.image.image = image
    return [i.id for i in (await servicer["ListImages"](req)).images]


async def test_ids_agree_and_lookups(service: ImageService, pushed: Pushed) -> None:
    servicer = image_service(service)
    image_id = await pull(servicer, pushed.ref("test/busybox:v1"))
    assert image_id == pushed.busybox.id
    for name in (image_id, image_id.removeprefix("sha256:"), pushed.ref("test/busybox:v1"),
                 pushed.ref(f"test/busybox@{pushed.busybox_digest}")):
        resp = await status(servicer, name)
        assert resp.image.id == image_id, name
        assert await listed(servicer, name) == [image_id]
    img = (await status(servicer, image_id)).image
    assert list(img.repo_tags) == [pushed.ref("test/busybox:v1")]
    assert img.uid.value == 1000 and img.username == ""
    assert img.size == sum(len(b) for b in pushed.busybox.blobs().values()) + \
        len(pushed.busybox.manifest_bytes())
    assert img.spec.image == image_id and not img.pinned


async def test_status_of_missing_image_is_empty(service: ImageService, pushed: Pushed) -> None:
    servicer = image_service(service)
    resp = await status(servicer, pushed.ref("test/busybox:nothere"))
    assert not resp.HasField("image") and dict(resp.info) == {}
    assert await listed(servicer, "sha256:" + "0" * 64) == []
    with pytest.raises(InvalidArgument):
        await status(servicer, "UPPER/case")


async def test_verbose_status(service: ImageService, pushed: Pushed) -> None:
    servicer = image_service(service)
    image_id = await pull(servicer, pushed.ref("test/busybox:v1"))
    info = json.loads((await status(servicer, image_id, verbose=True)).info["info"])
    assert info["id"] == image_id
    assert info["config"]["working_dir"] == "/tmp"
    assert info["config"]["labels"] == {"test": "busybox"}
    assert [layer["diff_id"] for layer in info["layers"]] == \
        json.loads(pushed.busybox.config_bytes())["rootfs"]["diff_ids"]


async def test_remove_by_tag_removes_all_tags_and_is_idempotent(
    service: ImageService, pushed: Pushed
) -> None:
    servicer = image_service(service)
    image_id = await pull(servicer, pushed.ref("test/multi:latest"))
    assert await pull(servicer, pushed.ref(f"test/multi@{pushed.multi_digest}")) == image_id
    before = await servicer["ImageFsInfo"](api_pb2.ImageFsInfoRequest())
    snapshot = service.snapshot_path(image_id)
    assert snapshot.exists()

    await servicer["RemoveImage"](api_pb2.RemoveImageRequest(image=spec(
        pushed.ref("test/multi:latest"))))
    assert await listed(servicer) == []
    assert not (await status(servicer, pushed.ref(f"test/multi@{pushed.multi_digest}"))
                ).HasField("image")
    assert not snapshot.exists()
    assert service.content.digests() == set()
    after = await servicer["ImageFsInfo"](api_pb2.ImageFsInfoRequest())
    old, new = before.image_filesystems[0], after.image_filesystems[0]
    assert new.used_bytes.value < old.used_bytes.value
    assert new.inodes_used.value < old.inodes_used.value
    # Missing image: still success.
    await servicer["RemoveImage"](api_pb2.RemoveImageRequest(image=spec(image_id)))


async def test_remove_by_digest_and_shared_layers_survive(
    service: ImageService, pushed: Pushed
) -> None:
    busybox = await service.pull(pushed.ref("test/busybox:v1"))
    multi = await service.pull(pushed.ref("test/multi"))
    await service.remove(pushed.ref(f"test/multi@{pushed.multi_digest}"))
    assert [r.id for r in service.images()] == [busybox]
    record = service.get(busybox)
    assert record is not None
    assert record.blobs <= service.content.digests()
    assert service.snapshot_path(busybox).exists()
    assert not service.snapshot_path(multi).exists()


async def test_image_in_use_keeps_content_until_unused(make_service: ServiceFactory,
                                                       pushed: Pushed) -> None:
    used: set[str] = set()
    svc = await make_service(in_use=lambda image_id: image_id in used)
    image_id = await svc.pull(pushed.ref("test/multi"))
    used.add(image_id)
    await svc.remove(image_id)
    assert svc.images() == [] and svc.get(image_id) is None
    assert svc.snapshot_path(image_id).exists()  # a container still runs from it
    assert svc.get_by_id(image_id) is not None
    used.clear()
    await svc.gc()
    assert not svc.snapshot_path(image_id).exists()
    assert svc.get_by_id(image_id) is None and svc.content.digests() == set()


async def test_pinned_images(make_service: ServiceFactory, pushed: Pushed) -> None:
    svc = await make_service(pinned_images=[pushed.ref("test/multi:latest")])
    servicer = image_service(svc)
    await pull(servicer, pushed.ref("test/multi"))
    await pull(servicer, pushed.ref("test/busybox:v1"))
    resp = await servicer["ListImages"](api_pb2.ListImagesRequest())
    assert {i.id: i.pinned for i in resp.images} == {pushed.multi[0].id: True,
                                                    pushed.busybox.id: False}


async def test_image_fs_info_reports_both_filesystems(service: ImageService, pushed: Pushed,
                                                      tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    containers.mkdir()
    (containers / "f").write_bytes(os.urandom(100_000))
    servicer = image_service(service, container_fs=containers)
    empty = await servicer["ImageFsInfo"](api_pb2.ImageFsInfoRequest())
    await pull(servicer, pushed.ref("test/busybox:v1"))
    full = await servicer["ImageFsInfo"](api_pb2.ImageFsInfoRequest())
    assert full.image_filesystems[0].fs_id.mountpoint == str(service.dir)
    assert full.image_filesystems[0].used_bytes.value > \
        empty.image_filesystems[0].used_bytes.value + len(pushed.busybox.layers[0].blob)
    assert full.container_filesystems[0].fs_id.mountpoint == str(containers)
    assert full.container_filesystems[0].used_bytes.value >= 100_000
    assert full.container_filesystems[0].inodes_used.value == 2


async def test_records_survive_restart_and_leftovers_are_cleaned(
    make_service: ServiceFactory, pushed: Pushed
) -> None:
    first = await make_service()
    image_id = await first.pull(pushed.ref("test/busybox:v1"))
    (first.content.dir / ".tmp-deadbeef-0001").write_bytes(b"partial")
    (first.snapshots.dir / ".tmp-deadbeef-0002").mkdir()
    second = await make_service()
    record = second.get(pushed.ref("test/busybox:v1"))
    assert record is not None and record.id == image_id
    assert not (first.content.dir / ".tmp-deadbeef-0001").exists()
    assert not (first.snapshots.dir / ".tmp-deadbeef-0002").exists()
    assert record.blobs <= second.content.digests()


async def test_tag_moves_to_the_newer_image(service: ImageService, pushed: Pushed) -> None:
    import aiohttp

    from tests.image.conftest import small_image
    from tests.image.oci import Pusher

    old, new = small_image("old\n"), small_image("new\n")
    async with aiohttp.ClientSession() as session:
        push = Pusher(session, pushed.registry.base)
        await push.image("test/moving", "v1", old)
        old_id = await service.pull(pushed.ref("test/moving:v1"))
        await push.image("test/moving", "v1", new)
        new_id = await service.pull(pushed.ref("test/moving:v1"))
    assert (old_id, new_id) == (old.id, new.id)
    old_record, new_record = service.get(old_id), service.get(new_id)
    assert old_record is not None and new_record is not None
    assert old_record.repo_tags == [] and new_record.repo_tags == [pushed.ref("test/moving:v1")]

