"""What critest checks of image volumes (Mount.image, image_volume.go) and of
SupplementalGroupsPolicy (security_context_linux.go), on real micro-VMs with images pulled from
a real registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from tests.cri_client import enum, msg
from tests.daemon import Daemon
from tests.e2e.test_containers_vm import Pod, running_pod
from tests.image.oci import E, Image, Layer, Pusher, tar_bytes
from tests.registry import Registry

pytestmark = pytest.mark.vm

VOLUME_PATH = "/mnt/image-volume"  # as critest mounts it


@pytest.fixture(scope="module")
async def pod(vm_daemon: Daemon, busybox_ref: str,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    async with running_pod(vm_daemon, busybox_ref, "iv-pod",
                           tmp_path_factory.mktemp("iv-logs")) as started:
        yield started


def image_volume(image_id: str, user_specified: str, sub_path: str = "",
                 readonly: bool = True) -> object:
    return msg("Mount", container_path=VOLUME_PATH, readonly=readonly, image_sub_path=sub_path,
               image=msg("ImageSpec", image=image_id, user_specified_image=user_specified))


async def test_image_volume_mounted_read_only(pod: Pod) -> None:
    """critest: digest in ContainerStatus; content visible, read-only, not noexec."""
    pulled = await pod.cri.image.PullImage(msg("PullImageRequest", image=msg(
        "ImageSpec", image=pod.image)))
    image_id = pulled.image_ref  # what kubelet puts in Mount.image.image
    cid = await pod.container("iv", "sleep", "3600", mounts=[image_volume(image_id, pod.image)])
    mounts = {m.container_path: m for m in (await pod.status(cid)).mounts}  # type: ignore[attr-defined]
    assert mounts[VOLUME_PATH].image.image_ref == image_id
    assert (await pod.exec(cid, "ls", "-A", f"{VOLUME_PATH}/bin/sh")).exit_code == 0  # type: ignore[attr-defined]
    touch = await pod.exec(cid, "touch", f"{VOLUME_PATH}/test-write")
    assert touch.exit_code != 0 and b"Read-only file system" in touch.stderr  # type: ignore[attr-defined]
    listed = await pod.exec(cid, f"{VOLUME_PATH}/bin/ls", VOLUME_PATH)
    assert listed.exit_code == 0 and b"etc" in listed.stdout.split(), listed  # type: ignore[attr-defined]
    # The container's own root stays writable: the volume is a mount of its own.
    assert (await pod.exec(cid, "touch", "/tmp/ok")).exit_code == 0  # type: ignore[attr-defined]
    await pod.remove(cid)


async def test_image_volume_sub_path(pod: Pod) -> None:
    image_id = await pod.image_id()
    cid = await pod.container("iv-sub", "sleep", "3600",
                        mounts=[image_volume(image_id, pod.image, sub_path="etc")])
    assert (await pod.exec(cid, "ls", f"{VOLUME_PATH}/etc/passwd")).exit_code != 0  # type: ignore[attr-defined]
    passwd = await pod.exec(cid, "cat", f"{VOLUME_PATH}/passwd")
    assert b"app:x:1000:1000" in passwd.stdout  # type: ignore[attr-defined]
    await pod.remove(cid)


async def test_image_volume_refusals(pod: Pod) -> None:
    image_id = await pod.image_id()
    before = {c.id for c in (await pod.cri.runtime.ListContainers()).containers}
    for mount, code in [
        (image_volume(image_id, pod.image, sub_path="not-existing"), grpc.StatusCode.NOT_FOUND),
        (image_volume(image_id, pod.image, readonly=False), grpc.StatusCode.INVALID_ARGUMENT),
        (image_volume("sha256:" + "0" * 64, ""), grpc.StatusCode.NOT_FOUND),  # not pulled
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pod.container("refused", "sleep", "3600", start=False, mounts=[mount])
        assert err.value.code() == code, err.value.details()
    assert {c.id for c in (await pod.cri.runtime.ListContainers()).containers} == before


async def test_remove_image_in_use_by_a_volume(pod: Pod, vm_daemon: Daemon,
                                                registry: Registry) -> None:
    """RemoveImage of an image a volume mounts: as for a container's own image, the image is
    gone from the list at once, its content stays while the container uses it."""
    data = Image([Layer(tar_bytes([E("data", "dir", mode=0o755),
                                   E("data/hello.txt", data=b"from the volume image\n")]))])
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("e2e/volume", "v1", data)
    ref = f"{registry.host}/e2e/volume:v1"
    image_id = (await pod.cri.image.PullImage(msg("PullImageRequest", image=msg(
        "ImageSpec", image=ref)))).image_ref
    cid = await pod.container("iv-data", "sleep", "3600",
                        mounts=[image_volume(image_id, ref, sub_path="data")])
    await pod.cri.image.RemoveImage(msg("RemoveImageRequest", image=msg("ImageSpec", image=ref)))
    status = await pod.cri.image.ImageStatus(msg("ImageStatusRequest", image=msg(
        "ImageSpec", image=image_id)))
    assert not status.HasField("image")
    hello = await pod.exec(cid, "cat", f"{VOLUME_PATH}/hello.txt")
    assert hello.stdout == b"from the volume image\n"  # type: ignore[attr-defined]
    snapshot = vm_daemon.root / "image" / "snapshots" / f"{image_id.removeprefix('sha256:')}.erofs"
    assert snapshot.exists()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # removed: no new user
        await pod.container("iv-late", "true", start=False,
                                mounts=[image_volume(image_id, ref)])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await pod.remove(cid)
    deadline = time.monotonic() + 30
    while snapshot.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not snapshot.exists()


async def _groups_container(pod: Pod, name: str, policy: str) -> tuple[str, object]:
    security = msg("LinuxContainerSecurityContext", run_as_user=msg("Int64Value", value=1000),
                   supplemental_groups=[1234], supplemental_groups_policy=enum(policy))
    cid = await pod.container(name, "sh", "-c", "id -G; sleep 3600",
                        linux=msg("LinuxContainerConfig", security_context=security))
    return cid, await pod.status(cid)


@pytest.mark.parametrize(("policy", "groups"), [
    # The image's /etc/group lists user app (1000) in group extra (2000).
    ("Merge", [1000, 1234, 2000]),
    ("Strict", [1000, 1234]),
])
async def test_supplemental_groups_policy(pod: Pod, policy: str, groups: list[int]) -> None:
    status = await pod.cri.runtime.Status(msg("StatusRequest"))
    assert status.features.supplemental_groups_policy
    name = f"groups-{policy.lower()}"
    cid, container = await _groups_container(pod, name, policy)
    user = container.user.linux  # type: ignore[attr-defined]
    assert (user.uid, user.gid, sorted(user.supplemental_groups)) == (1000, 1000, groups)
    expected = " ".join(map(str, groups)).encode()
    log = pod.logs / f"{name}.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and b"stdout F" in log.read_bytes()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert log.read_bytes().split(b"stdout F ", 1)[1].strip() == expected
    assert (await pod.exec(cid, "id", "-G")).stdout.strip() == expected  # type: ignore[attr-defined]
    await pod.remove(cid)
