"""What the runtime promises a backend (criserver/runtime/backend.py): which calls may overlap,
and that ListContainerStats asks once per pod."""

from __future__ import annotations

from pathlib import Path

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime import container_stats
from criserver.runtime.backend import BackendContext
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
