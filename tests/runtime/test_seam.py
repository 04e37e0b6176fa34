"""What the runtime promises a backend (criserver/runtime/backend.py): which calls may overlap,
and that ListContainerStats asks once per pod."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime import container_exec, container_stats, container_update
from criserver.runtime.backend import (
    BackendContext,
    ContainerCreated,
    ExecResult,
    SandboxStarted,
)
from criserver.runtime.undo import UndoStack
from criserver.store.records import ContainerRecord, PodRecord
from tests.runtime.inprocess import ScriptedBackend, in_process


class MeasuringBackend(ScriptedBackend):
    """Records each batched stats call; knows no per-container stats at all."""

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.asked: list[tuple[str, list[str]]] = []

    async def containers_stats(
        self, pod: PodRecord, containers: list[ContainerRecord]
    ) -> list[cri.ContainerStats]:
        self.asked.append((pod.id, sorted(c.id for c in containers)))
        return [cri.ContainerStats(attributes=cri.ContainerAttributes(id=c.id))
                for c in containers]


async def test_list_container_stats_asks_once_per_pod(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db", MeasuringBackend) as p:
        backend = p.backend
        assert isinstance(backend, MeasuringBackend)
        pods = [await p.run_pod("one"), await p.run_pod("two")]
        running: dict[str, list[str]] = {}
        for pod_id in pods:
            for name in ("a", "b"):
                container_id = await p.create(pod_id, name)
                await p.start(container_id)
                running.setdefault(pod_id, []).append(container_id)
        await p.create(pods[0], "created-only")  # not running: not measured
        listed = await container_stats.list_container_stats(
            p.rt, cri.ListContainerStatsRequest())
        assert sorted(backend.asked) == sorted((pod_id, sorted(ids))
                                               for pod_id, ids in running.items())
        assert sorted(s.attributes.id for s in listed.stats) == sorted(
            i for ids in running.values() for i in ids)


class WedgedBackend(MeasuringBackend):
    """A pod named "wedged" does not answer for its stats until `thawed` is set, as a guest
    that stopped running; `asked` counts the calls that reached it."""

    thawed = asyncio.Event()
    asked = 0

    async def _wedge(self, pod: PodRecord) -> None:
        if pod.config.metadata.name == "wedged":
            WedgedBackend.asked += 1
            await self.thawed.wait()

    async def containers_stats(
        self, pod: PodRecord, containers: list[ContainerRecord]
    ) -> list[cri.ContainerStats]:
        await self._wedge(pod)
        return await super().containers_stats(pod, containers)

    async def sandbox_stats(self, pod: PodRecord) -> cri.PodSandboxStats:
        await self._wedge(pod)
        return cri.PodSandboxStats(attributes=cri.PodSandboxAttributes(id=pod.id))


async def test_a_wedged_pod_is_left_out_of_stats_lists_not_holding_them_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(container_stats, "LIST_POD_TIMEOUT", 0.2)
    async with in_process(tmp_path / "db", WedgedBackend) as p:
        ids = {}
        for name in ("wedged", "fine", "also-fine"):
            pod_id = await p.run_pod(name)
            container_id = await p.create(pod_id, "app")
            await p.start(container_id)
            ids[name] = (pod_id, container_id)
        async with asyncio.timeout(2):  # every pod asked at once: one timeout, not three
            listed = await container_stats.list_container_stats(
                p.rt, cri.ListContainerStatsRequest())
            pods = await container_stats.list_pod_sandbox_stats(
                p.rt, cri.ListPodSandboxStatsRequest())
        assert sorted(s.attributes.id for s in listed.stats) == sorted(
            ids[name][1] for name in ("fine", "also-fine"))
        assert sorted(s.attributes.id for s in pods.stats) == sorted(
            ids[name][0] for name in ("fine", "also-fine"))
        # Its late call still runs: later lists leave the pod out without waiting again.
        assert WedgedBackend.asked == 1
        async with asyncio.timeout(0.1):
            for _ in range(5):
                listed = await container_stats.list_container_stats(
                    p.rt, cri.ListContainerStatsRequest())
                assert len(listed.stats) == 2
        assert WedgedBackend.asked == 1
        # Once the guest answers, the pod is in the lists again.
        WedgedBackend.thawed.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        listed = await container_stats.list_container_stats(p.rt,
                                                             cri.ListContainerStatsRequest())
        assert ids["wedged"][1] in {s.attributes.id for s in listed.stats}


POD_CALLS = {"run_sandbox", "stop_sandbox", "remove_sandbox"}


class OverlapBackend(ScriptedBackend):
    """Records every call that overlaps one the contract says it never overlaps. Each
    lifecycle call yields to the loop a few times, so overlaps have a chance to happen."""

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.active: list[tuple[str, str, str]] = []  # (call, pod id, container id)
        self.broken: list[tuple[tuple[str, str, str], tuple[str, str, str]]] = []
        self.side_by_side = 0  # container calls entered while another container's ran

    @asynccontextmanager
    async def call(self, name: str, pod_id: str, container_id: str = "") -> AsyncIterator[None]:
        me = (name, pod_id, container_id)
        for other in self.active:
            if other[1] != pod_id:
                continue
            if name in POD_CALLS or other[0] in POD_CALLS or other[2] == container_id:
                self.broken.append((other, me))
            else:
                self.side_by_side += 1
        self.active.append(me)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            yield
        finally:
            self.active.remove(me)

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        async with self.call("run_sandbox", pod.id):
            return await super().run_sandbox(pod, undo)

    async def stop_sandbox(self, pod: PodRecord) -> None:
        async with self.call("stop_sandbox", pod.id):
            await super().stop_sandbox(pod)

    async def remove_sandbox(self, pod: PodRecord) -> None:
        async with self.call("remove_sandbox", pod.id):
            await super().remove_sandbox(pod)

    async def create_container(
        self, pod: PodRecord, container: ContainerRecord, undo: UndoStack
    ) -> ContainerCreated:
        async with self.call("create_container", pod.id, container.id):
            return await super().create_container(pod, container, undo)

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        async with self.call("start_container", pod.id, container.id):
            return await super().start_container(pod, container)

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        async with self.call("stop_container", pod.id, container.id):
            await super().stop_container(pod, container, timeout)

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        async with self.call("remove_container", pod.id, container.id):
            await super().remove_container(pod, container)

    async def update_container_resources(
        self, pod: PodRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        async with self.call("update_container_resources", pod.id, container.id):
            return None


async def test_calls_of_one_pod_overlap_only_as_promised(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db", OverlapBackend) as p:
        backend = p.backend
        assert isinstance(backend, OverlapBackend)
        pod_id = await p.run_pod()
        ids = [await p.create(pod_id, f"c{i}") for i in range(4)]
        await asyncio.gather(*(p.start(i) for i in ids[:3]))

        async def update(container_id: str) -> None:
            await container_update.update_container_resources(
                p.rt, cri.UpdateContainerResourcesRequest(
                    container_id=container_id, linux=cri.LinuxContainerResources()))

        # kubelet can send all of these at once (a pod deleted while it syncs).
        calls = [p.stop(ids[0]), p.remove(ids[0]), update(ids[1]), p.stop(ids[1]),
                 p.start(ids[3]), p.stop(ids[2]), p.create(pod_id, "late"),
                 p.stop_pod(pod_id), p.remove(ids[2]), p.remove_pod(pod_id), update(ids[3])]
        await asyncio.gather(*calls, return_exceptions=True)  # some lose the race: fine
        assert backend.broken == []
        assert backend.side_by_side > 0  # different containers were not serialised
        assert p.rt.pods.find(pod_id) is None


class BlockingBackend(ScriptedBackend):
    """stop_container waits until the test lets it go; exec and stats answer at once."""

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()
        self.sandbox_stopped = False

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        self.stopping.set()
        await self.release.wait()
        await super().stop_container(pod, container, timeout)

    async def stop_sandbox(self, pod: PodRecord) -> None:
        self.sandbox_stopped = True

    async def update_container_resources(
        self, pod: PodRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        return None

    async def exec_sync(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], timeout: float
    ) -> ExecResult:
        return ExecResult(exit_code=0, stdout=b"", stderr=b"")

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> cri.ContainerStats:
        return cri.ContainerStats(attributes=cri.ContainerAttributes(id=container.id))


async def test_a_long_container_stop_holds_up_the_pod_stop_not_exec_or_stats(
    tmp_path: Path
) -> None:
    async with in_process(tmp_path / "db", BlockingBackend) as p:
        backend = p.backend
        assert isinstance(backend, BlockingBackend)
        pod_id = await p.run_pod()
        ids = [await p.create(pod_id, name) for name in ("slow", "other")]
        for container_id in ids:
            await p.start(container_id)
        stop = asyncio.create_task(p.stop(ids[0]))
        await asyncio.wait_for(backend.stopping.wait(), 5)
        # Queries and exec of the same container, and another container's calls, go on.
        await asyncio.wait_for(container_exec.exec_sync(p.rt, cri.ExecSyncRequest(
            container_id=ids[0], cmd=["true"])), 5)
        await asyncio.wait_for(container_stats.container_stats(
            p.rt, cri.ContainerStatsRequest(container_id=ids[0])), 5)
        await asyncio.wait_for(container_update.update_container_resources(
            p.rt, cri.UpdateContainerResourcesRequest(
                container_id=ids[1], linux=cri.LinuxContainerResources())), 5)
        stop_pod = asyncio.create_task(p.stop_pod(pod_id))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not backend.sandbox_stopped and not stop_pod.done()  # waits for the stop
        backend.release.set()
        await asyncio.wait_for(asyncio.gather(stop, stop_pod), 5)
        assert backend.sandbox_stopped
