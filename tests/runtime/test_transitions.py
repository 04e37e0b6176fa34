"""Each state change persists its record and publishes its CRI event, once, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime.backend import ContainerCreated
from criserver.runtime.runtime import BackendEventSink
from criserver.runtime.undo import UndoStack
from criserver.store.records import ContainerExit, ContainerRecord, ContainerState, PodRecord
from tests.runtime.inprocess import in_process

CREATED, STARTED = "CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT"
STOPPED, DELETED = "CONTAINER_STOPPED_EVENT", "CONTAINER_DELETED_EVENT"


async def test_a_whole_pod_life_in_events(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        pod = await p.run_pod()
        cid = await p.create(pod)
        await p.start(cid)
        await p.stop(cid)
        await p.remove(cid)
        await p.stop_pod(pod)
        await p.stop_pod(pod)  # stopped already: no second event
        await p.remove_pod(pod)
        assert await p.events.names() == [
            (pod, CREATED), (pod, STARTED), (cid, CREATED), (cid, STARTED), (cid, STOPPED),
            (cid, DELETED), (pod, STOPPED), (pod, DELETED),
        ]


async def test_events_carry_the_pod_and_its_containers_as_they_are(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        pod = await p.run_pod()
        cid = await p.create(pod)
        await p.start(cid)
        started = (await p.events.all())[-1]
        assert started.pod_sandbox_status.state == cri.SANDBOX_READY
        assert [c.state for c in started.containers_statuses] == [cri.CONTAINER_RUNNING]
        await p.stop_pod(pod)
        await p.remove(cid)
        removed = (await p.events.all())[-1]
        assert removed.container_id == cid
        assert removed.pod_sandbox_status.state == cri.SANDBOX_NOTREADY
        assert list(removed.containers_statuses) == []


async def test_the_first_exit_stands_and_is_announced_once(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        pod = await p.run_pod()
        cid = await p.create(pod)
        await p.start(cid)
        await p.backend.report_exit(cid, ContainerExit(3, "Error", "", 5))
        await p.stop(cid)  # reports exit 0: too late
        await BackendEventSink(p.rt).sandbox_exited(pod, "VMExited", "")
        assert (p.container(cid).exit_code, p.container(cid).finished_at) == (3, 5)
        names = await p.events.names()
        assert names.count((cid, STOPPED)) == 1 and names.count((pod, STOPPED)) == 1


async def test_an_exit_reported_during_start_follows_the_start(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        p.backend.exit_during_start = ContainerExit(1, "Error", "boom", 9)
        await p.start(cid)
        c = p.container(cid)
        assert (c.state, c.exit_code, c.message, c.finished_at) == (
            ContainerState.EXITED, 1, "boom", 9)
        assert (await p.events.names())[-2:] == [(cid, STARTED), (cid, STOPPED)]


async def test_failed_creations_are_never_announced(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        pod = await p.run_pod()

        async def fail(pod: PodRecord, container: ContainerRecord,
                       undo: UndoStack) -> ContainerCreated:
            raise RuntimeError("no image")

        p.backend.create_container = fail  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await p.create(pod)
        assert p.rt.containers.of_pod(pod) == []
        assert await p.events.names() == [(pod, CREATED), (pod, STARTED)]


async def test_resources_update_changes_the_config_only(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        before = len(await p.events.all())
        await p.rt.transitions.resources_updated(cid, cri.LinuxContainerResources(cpu_shares=512))
        c = p.container(cid)
        assert (c.state, c.config.linux.resources.cpu_shares) == (ContainerState.CREATED, 512)
        assert c.config.metadata.name == "c" and len(await p.events.all()) == before


async def test_an_early_exit_survives_a_restart(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        await BackendEventSink(p.rt).container_exited(cid, 2, "Error", "gone early", 11)
        assert p.container(cid).state == ContainerState.CREATED
    async with in_process(tmp_path / "db") as p:  # the daemon restarted
        assert p.container(cid).early_exit == ContainerExit(2, "Error", "gone early", 11)
        await p.start(cid)
        c = p.container(cid)
        assert (c.state, c.exit_code, c.finished_at, c.early_exit) == (
            ContainerState.EXITED, 2, 11, None)
        assert await p.events.names() == [(cid, STARTED), (cid, STOPPED)]


async def test_an_exit_for_a_removed_container_is_ignored(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        await p.remove(cid)
        await BackendEventSink(p.rt).container_exited(cid, 0, "Completed", "", 1)
        assert p.rt.containers.find(cid) is None


async def test_a_start_found_at_restart_is_recorded_once(tmp_path: Path) -> None:
    """A backend that finds a CREATED container running (the daemon died inside StartContainer
    after the guest started it) records it RUNNING with its start time, announced once; the
    report changes nothing on a container past CREATED or removed."""
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        sink = BackendEventSink(p.rt)
        await sink.container_started(cid, 42)
        c = p.container(cid)
        assert (c.state, c.started_at) == (ContainerState.RUNNING, 42)
        await sink.container_started(cid, 43)
        assert p.container(cid).started_at == 42
        assert (await p.events.names()).count((cid, STARTED)) == 1
        await p.stop(cid)
        await sink.container_started(cid, 44)
        assert p.container(cid).state == ContainerState.EXITED
        await p.remove(cid)
        await sink.container_started(cid, 45)
        assert p.rt.containers.find(cid) is None
