"""CRI stats from the agent's Stats answer (guest_metrics): the pod's network usage, eth0 as
the default interface; and the backend asks the agent once for a pod's containers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend
from criserver.backends.microvm.guest_metrics import pod_stats
from criserver.config import Config
from criserver.runtime.backend import BackendContext
from criserver.store.records import ContainerRecord, PodRecord
from vmagent.api import agent_pb2 as pb

POD = PodRecord(id="ab" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                created_at=1)


class FakeAgent:
    def __init__(self, reply: pb.StatsResponse) -> None:
        self.reply = reply
        self.requests: list[pb.StatsRequest | None] = []

    async def stats(self, request: pb.StatsRequest | None = None) -> pb.StatsResponse:
        self.requests.append(request)
        return self.reply


def _backend(tmp_path: Path, agent: FakeAgent) -> MicroVMBackend:
    context = BackendContext(handler="microvm", root=tmp_path / "root",
                             state=tmp_path / "state", config=Config(),
                             events=None)  # type: ignore[arg-type]
    backend = MicroVMBackend({"assets_dir": str(tmp_path / "no-assets")}, context)
    backend._pods[POD.id] = SimpleNamespace(agent=agent)  # type: ignore[assignment]
    return backend


def test_sandbox_stats_carry_network_usage() -> None:
    stats = pod_stats(POD, pb.StatsResponse(
        guest=pb.GuestStats(timestamp_unix_nanos=123),
        interfaces=[pb.InterfaceStats(name="eth1", rx_bytes=5, tx_bytes=6),
                    pb.InterfaceStats(name="eth0", rx_bytes=1000, rx_errors=2, tx_bytes=500,
                                      tx_errors=3)]))
    network = stats.linux.network
    assert network.timestamp == 123
    default = network.default_interface
    assert (default.name, default.rx_bytes.value, default.rx_errors.value,
            default.tx_bytes.value, default.tx_errors.value) == ("eth0", 1000, 2, 500, 3)
    # the others apart: a consumer adding default and list counts eth0 once
    assert [(i.name, i.rx_bytes.value, i.tx_bytes.value) for i in network.interfaces] == [
        ("eth1", 5, 6)]


def test_sandbox_stats_without_interfaces_have_no_network() -> None:
    stats = pod_stats(POD, pb.StatsResponse(guest=pb.GuestStats(timestamp_unix_nanos=1)))
    assert not stats.linux.HasField("network")


async def test_containers_stats_ask_the_agent_once_for_them_all(tmp_path: Path) -> None:
    a, b, gone = (ContainerRecord(id=c * 64, pod_id=POD.id, config=cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=c)), created_at=1) for c in "abc")
    agent = FakeAgent(pb.StatsResponse(containers=[
        pb.ContainerStats(container_id=b.id, cpu_usage_nanos=7),
        pb.ContainerStats(container_id=a.id, cpu_usage_nanos=3),
        pb.ContainerStats(container_id="other", cpu_usage_nanos=1)]))  # not asked for
    stats = await _backend(tmp_path, agent).containers_stats(POD, [a, b, gone])
    assert [r.container_ids if r else None for r in agent.requests] == [[a.id, b.id, gone.id]]
    # `gone` has no stats in the guest: left out, not an error
    assert sorted((s.attributes.id, s.attributes.metadata.name, s.cpu.usage_core_nano_seconds.value)
                  for s in stats) == [(a.id, "a", 3), (b.id, "b", 7)]


async def test_sandbox_stats_ask_the_agent_without_details(tmp_path: Path) -> None:
    agent = FakeAgent(pb.StatsResponse(guest=pb.GuestStats(timestamp_unix_nanos=1)))
    await _backend(tmp_path, agent).sandbox_stats(POD)
    assert agent.requests and not any(r is not None and r.details for r in agent.requests)


async def test_concurrent_stats_callers_share_one_agent_call(tmp_path: Path) -> None:
    """kubelet, a metrics scraper and crictl asking at once: one Stats call in the guest."""

    class SlowAgent(FakeAgent):
        async def stats(self, request: pb.StatsRequest | None = None) -> pb.StatsResponse:
            await asyncio.sleep(0.05)
            return await super().stats(request)

    a = ContainerRecord(id="a" * 64, pod_id=POD.id, config=cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="a")), created_at=1)
    agent = SlowAgent(pb.StatsResponse(containers=[pb.ContainerStats(container_id=a.id)]))
    backend = _backend(tmp_path, agent)
    answers = await asyncio.gather(*(backend.containers_stats(POD, [a]) for _ in range(5)),
                                   backend.sandbox_stats(POD))
    assert all(len(stats) == 1 for stats in answers[:5])
    assert len(agent.requests) == 2  # one for the containers, one for the pod
