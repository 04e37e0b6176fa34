"""Pulls from a real docker-registry: layers with whiteouts and opaque dirs (gzip, zstd,
plain), an index with two platforms, basic auth, and the snapshot that comes out."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import aiohttp
import pytest

from criserver.config import ImageConfig
from criserver.errors import FailedPrecondition, NotFound
from criserver.image import ImageService
from criserver.image.auth import Credentials
from criserver.image.content import TMP_PREFIX
from tests.image.conftest import (
    PASSWORD,
    T0,
    USER,
    Pushed,
    Registry,
    ServiceFactory,
    busybox_image,
    erofs_inode,
    small_image,
    snapshot_root,
)
from tests.image.oci import Pusher, sha

pytestmark = pytest.mark.registry


async def test_pull_builds_a_usable_root_filesystem(
    service: ImageService, pushed: Pushed, tmp_path: Path
) -> None:
    image_id = await service.pull(pushed.ref("test/busybox:v1"))

    assert image_id == pushed.busybox.id
    record = service.get(image_id)
    assert record is not None
    assert record.repo_tags == [pushed.ref("test/busybox:v1")]
    assert record.repo_digests == [pushed.ref(f"test/busybox@{pushed.busybox_digest}")]
    assert record.uid == 1000 and record.username == ""
    assert record.config["entrypoint"] == ["/bin/sh"]
    assert record.config["exposed_ports"] == ["80/tcp"]
    assert record.config["stop_signal"] == "SIGINT"
    for layer in pushed.busybox.layers:
        assert (service.content.path(sha(layer.blob))).read_bytes() == layer.blob

    with snapshot_root(service.snapshot_path(image_id), tmp_path) as (root, mounted):
        check_busybox_tree(root, mounted)
    snapshot = service.snapshot_path(image_id)
    assert erofs_inode(snapshot, "/bin/ls") == erofs_inode(snapshot, "/bin/busybox")
    assert erofs_inode(snapshot, "/bin/ls")[1] == 2


def check_busybox_tree(root: Path, mounted: bool) -> None:
    # Whiteouts: a file, a directory, and an opaque directory keeping only the new file.
    assert not (root / "tmp/gone").exists()
    assert not (root / "var/lib/data").exists()
    assert sorted(os.listdir(root / "etc/old")) == ["c.txt"]
    assert stat.S_IMODE((root / "etc/old").stat().st_mode) == 0o750
    assert "app:x:1000" in (root / "etc/passwd").read_text()
    assert (root / "usr/share/hello").read_text() == "hello from layer 3\n"
    # Links, ownership, modes, mtimes.
    assert os.readlink(root / "bin/sh") == "busybox"
    suid = (root / "usr/bin/suid").stat()
    assert stat.S_IMODE(suid.st_mode) == (0o4755 if mounted else 0o755)
    assert (suid.st_uid, suid.st_gid) == (1000, 1000)
    assert int(suid.st_mtime) == T0 + 12345
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    # The snapshot is a root a container can run from.
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "ls /usr/share; echo ok"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["hello", "ok"]


async def test_pull_by_digest_and_by_tag_agree(service: ImageService, pushed: Pushed) -> None:
    by_digest = await service.pull(pushed.ref(f"test/busybox@{pushed.busybox_digest}"))
    by_tag = await service.pull(pushed.ref("test/busybox:v1"))
    assert by_digest == by_tag
    record = service.get(by_tag)
    assert record is not None
    assert record.repo_tags == [pushed.ref("test/busybox:v1")]
    assert service.get(pushed.ref(f"test/busybox@{pushed.busybox_digest}")) is record


async def test_index_selects_linux_amd64(service: ImageService, pushed: Pushed,
                                         tmp_path: Path) -> None:
    image_id = await service.pull(pushed.ref("test/multi"))
    amd64 = pushed.multi[0]
    assert image_id == amd64.id
    record = service.get(pushed.ref("test/multi:latest"))
    assert record is not None
    assert record.index_digest == pushed.multi_digest
    assert record.manifest_digest == sha(amd64.manifest_bytes())
    assert record.repo_digests == [pushed.ref(f"test/multi@{pushed.multi_digest}")]
    assert record.username == "nobody" and record.uid is None
    with snapshot_root(service.snapshot_path(image_id), tmp_path) as (root, _):
        assert (root / "hello.txt").read_text() == "amd64 world\n"


async def test_index_without_our_platform_is_refused(
    make_service: ServiceFactory, pushed: Pushed
) -> None:
    from criserver.image.manifest import Platform

    svc = await make_service(platform=Platform("linux", "s390x", ""))
    with pytest.raises(FailedPrecondition, match="no manifest for linux/s390x"):
        await svc.pull(pushed.ref("test/multi"))


async def test_missing_image_is_not_found(service: ImageService, pushed: Pushed) -> None:
    with pytest.raises(NotFound):
        await service.pull(pushed.ref("test/busybox:nope"))
    with pytest.raises(NotFound):
        await service.pull(pushed.ref("test/absent:v1"))


async def test_docker_schema2_image(service: ImageService, registry: Registry) -> None:
    image = small_image("docker schema2\n")
    image.docker = True
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("test/docker", "v2", image)
    assert await service.pull(f"{registry.host}/test/docker:v2") == image.id


async def test_basic_auth_registry(make_service: ServiceFactory,
                                   auth_registry: Registry) -> None:
    image = small_image("behind basic auth\n")
    async with aiohttp.ClientSession() as session:
        push = Pusher(session, auth_registry.base, auth_registry.authorization)
        await push.image("private/x", "1", image)
    svc = await make_service()
    ref = f"{auth_registry.host}/private/x:1"
    with pytest.raises(FailedPrecondition, match="requires credentials"):
        await svc.pull(ref)
    with pytest.raises(FailedPrecondition, match="access denied"):
        await svc.pull(ref, Credentials(USER, "wrong"))
    assert await svc.pull(ref, Credentials(USER, PASSWORD)) == image.id


async def test_concurrent_pulls_share_one_download(service: ImageService,
                                                   registry: Registry) -> None:
    image = busybox_image(("gzip", "gzip", "gzip"))
    image.config["Labels"] = {"variant": "single-flight"}
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("test/sf", "v1", image)
    seen: dict[str, int] = {}

    def progress(digest: str, done: int, total: int) -> None:
        seen[digest] = done

    ids = await asyncio.gather(*(service.pull(f"{registry.host}/test/sf:v1", None, progress)
                                 for _ in range(3)))
    assert set(ids) == {image.id}
    assert seen == {sha(x.blob): len(x.blob) for x in image.layers}


async def test_cancelled_pull_leaves_no_partial_blob(service: ImageService,
                                                     registry: Registry) -> None:
    big = small_image("x")
    big.layers[0].blob = b""
    from tests.image.oci import E, Layer, tar_bytes

    big.layers = [Layer(tar_bytes([E("big", data=os.urandom(24 * 1024 * 1024))]), "")]
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("test/big", "v1", big)
    started = asyncio.Event()
    task = asyncio.ensure_future(service.pull(f"{registry.host}/test/big:v1", None,
                                              lambda d, done, total: started.set()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    blob_dir = service.content.dir
    assert [p for p in os.listdir(blob_dir) if p.startswith(TMP_PREFIX)] == []
    assert not service.content.has(sha(big.layers[0].blob))
    assert not (blob_dir / sha(big.layers[0].blob).removeprefix("sha256:")).exists()
    assert service.get(f"{registry.host}/test/big:v1") is None


async def test_mirror_falls_back_to_upstream(make_service: ServiceFactory,
                                             pushed: Pushed) -> None:
    from tests.image.conftest import free_port

    dead_mirror = f"http://127.0.0.1:{free_port()}"
    config = ImageConfig(mirrors={pushed.registry.host: [dead_mirror]})
    svc = await make_service(config=config)
    assert await svc.pull(pushed.ref("test/multi")) == pushed.multi[0].id


async def test_blobs_and_snapshot_of_a_pull_the_daemon_died_in_are_removed_at_start(
        make_service: ServiceFactory, registry: Registry) -> None:
    """A daemon killed after a pull stored its blobs and built its snapshot but before the
    record was saved (the crash test's pull.content_stored and image.snapshot_built) left them
    for good: nothing names them, and gc ran only after a RemoveImage."""
    image = small_image("died mid-pull\n")
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("test/died", "v1", image)
    first: ImageService = await make_service()
    image_id = await first.pull(f"{registry.host}/test/died:v1")
    blobs = first.content.digests()
    snapshot = first.snapshots.path(image_id)
    assert snapshot.exists() and blobs
    # What the dead daemon left: the content and the snapshot, no record.
    await first.records.delete(image_id)

    second: ImageService = await make_service()
    assert second.content.digests() == set()
    assert os.listdir(second.content.dir) == []
    assert not snapshot.exists()
    assert await second.pull(f"{registry.host}/test/died:v1") == image_id
    assert second.content.digests() == blobs and snapshot.exists()


async def test_start_keeps_what_records_name(make_service: ServiceFactory,
                                             registry: Registry) -> None:
    image = small_image("kept across restarts\n")
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("test/kept", "v1", image)
    first: ImageService = await make_service()
    image_id = await first.pull(f"{registry.host}/test/kept:v1")
    second: ImageService = await make_service()
    assert second.content.digests() == first.content.digests()
    assert second.snapshots.path(image_id).exists()
