"""The daemon's database made read-only under it (issue 18): `chattr +i` on criserver.db and its
-wal (chmod is nothing to root). Calls that change state answer UNAVAILABLE naming the store,
never UNKNOWN or a bare INTERNAL; read calls answer as before; nothing half-changed is kept in
memory or on disk; and once the file is writable again the same calls work, no restart.

(The -shm file is left alone: sqlite maps it, and a write to a mapped immutable file is a
SIGBUS, which no process survives.)"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import grpc
import pytest

from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon
from tests.image.oci import Pusher
from tests.registry import Registry, small_image

pytestmark = [
    pytest.mark.registry,
    pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i: needs root"),
]


@contextmanager
def immutable(daemon: Daemon) -> Iterator[None]:
    db = daemon.root / "criserver.db"
    files = [str(p) for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)


async def _refused(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    details = err.value.details() or ""
    assert "criserver.db" in details, details
    return details


async def _state(cri: CRIClient) -> tuple[object, ...]:
    pods = sorted((p.id, p.state) for p in (await cri.runtime.ListPodSandbox()).items)
    containers = sorted((c.id, c.state) for c in (await cri.runtime.ListContainers()).containers)
    images = sorted(i.id for i in (await cri.image.ListImages(msg("ListImagesRequest"))).images)
    return pods, containers, images


async def test_a_read_only_store_refuses_changes_clearly_and_recovers(
        daemon: Daemon, registry: Registry) -> None:
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("ro/img", "v1", small_image("ro\n"))
    ref = f"{registry.host}/ro/img:v1"
    cri = daemon.client()
    try:
        pod = await cri.run_pod("kept")
        cid = await cri.create_container(pod, "kept-ctr", pod_name="kept")
        before = await _state(cri)
        with immutable(daemon):
            await _refused(cri.run_pod("new"))
            await _refused(cri.create_container(pod, "new-ctr", pod_name="kept"))
            await _refused(cri.runtime.StartContainer(msg("StartContainerRequest",
                                                          container_id=cid)))
            await _refused(cri.runtime.RemoveContainer(msg("RemoveContainerRequest",
                                                           container_id=cid)))
            await _refused(cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest",
                                                          pod_sandbox_id=pod)))
            await _refused(cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                            pod_sandbox_id=pod)))
            await _refused(cri.image.PullImage(msg("PullImageRequest",
                                                   image=msg("ImageSpec", image=ref))))
            # Reads answer, and show what the database holds: nothing half-changed.
            assert await _state(cri) == before
            status = (await cri.runtime.ContainerStatus(
                msg("ContainerStatusRequest", container_id=cid))).status
            assert status.state == enum("CONTAINER_CREATED")
            assert (await cri.runtime.Status(msg("StatusRequest"))).status.conditions
            # The failed pull kept nothing of its content either.
            blobs = daemon.root / "image" / "blobs" / "sha256"
            assert [p.name for p in blobs.iterdir()] == []
        assert daemon.process is not None and daemon.process.poll() is None

        # Writable again: the same calls work, same names, no restart.
        new_pod = await cri.run_pod("new")
        await cri.create_container(pod, "new-ctr", pod_name="kept")
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=ref)))
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod))
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                               pod_sandbox_id=new_pod))
        assert (await _state(cri))[:2] == ([], [])
    finally:
        await cri.close()
    daemon.stop()
    # The file is whole, and it holds what the daemon answered.
    conn = sqlite3.connect(daemon.root / "criserver.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM pods").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM containers").fetchone() == (0,)
    finally:
        conn.close()
