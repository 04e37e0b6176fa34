"""The CRI metrics of a pod in a real micro-VM, measured by the agent in the guest: descriptors
and series as critest's metrics specs check them, and values that make sense (memory in use,
processes running, the limits set, CPU time that grows)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cri_client import CRIClient, msg
from tests.daemon import Daemon
from tests.runtime.test_metrics import check_like_critest

pytestmark = pytest.mark.vm

MiB = 1024 * 1024


@dataclass
class Pod:
    cri: CRIClient
    id: str
    name: str
    image: str

    async def container(self, name: str, *command: str, **fields: object) -> str:
        cid = await self.cri.create_container(self.id, name, pod_name=self.name,
                                              image=self.image, command=list(command), **fields)
        await self.cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        return cid

    async def metrics(self) -> Any:
        reply = await self.cri.runtime.ListPodSandboxMetrics(msg("ListPodSandboxMetricsRequest"))
        return next(m for m in reply.pod_metrics if m.pod_sandbox_id == self.id)


@pytest.fixture(scope="module")
async def pod(vm_daemon: Daemon, busybox_ref: str) -> AsyncIterator[Pod]:
    cri = vm_daemon.client()
    await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=busybox_ref)))
    pod_id = await cri.run_pod("metrics-pod")
    yield Pod(cri, pod_id, "metrics-pod", busybox_ref)
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.close()


def _series(container_metrics: Any, cid: str) -> dict[str, Any]:
    """name -> the container's first series of that name."""
    ours = next(c for c in container_metrics if c.container_id == cid)
    out: dict[str, Any] = {}
    for m in ours.metrics:
        out.setdefault(m.name, m)
    return out


async def test_metrics_as_critest_checks_them(pod: Pod) -> None:
    # critest's container: its limits, then files written in its writable layer.
    resources = msg("LinuxContainerResources", cpu_period=100000, cpu_quota=20000,
                    cpu_shares=1024, memory_limit_in_bytes=64 * MiB,
                    memory_swap_limit_in_bytes=64 * MiB)
    cid = await pod.container("limited", "sleep", "3600",
                              linux=msg("LinuxContainerConfig", resources=resources))
    done = await pod.cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid, timeout=60, cmd=[
        "/bin/sh", "-c", "mkdir -p /var/lib/mydisktest && for i in $(seq 1 10); do "
        "echo hi >> /var/lib/mydisktest/inode_test_file_$i; done; sync"]))
    assert done.exit_code == 0, done

    descriptors = (await pod.cri.runtime.ListMetricDescriptors(
        msg("ListMetricDescriptorsRequest"))).descriptors
    mine = await pod.metrics()
    check_like_critest(list(descriptors), mine)

    s = _series(mine.container_metrics, cid)
    labels = dict(zip(next(d for d in descriptors if d.name == "container_processes").label_keys,
                      s["container_processes"].label_values, strict=True))
    assert labels == {"container": "limited", "id": cid, "image": pod.image, "name": cid,
                      "namespace": "default", "pod": pod.name}
    assert s["container_processes"].value.value >= 1
    assert s["container_threads"].value.value >= 1
    assert s["container_file_descriptors"].value.value >= 1
    assert s["container_memory_working_set_bytes"].value.value > 0
    assert s["container_memory_usage_bytes"].value.value > 0
    assert s["container_spec_memory_limit_bytes"].value.value == 64 * MiB
    assert s["container_spec_memory_swap_limit_bytes"].value.value == 64 * MiB
    assert (s["container_spec_cpu_quota"].value.value, s["container_spec_cpu_period"].value.value
            ) == (20000, 100000)
    assert abs(s["container_spec_cpu_shares"].value.value - 1024) < 30  # through cpu.weight
    assert s["container_fs_usage_bytes"].value.value > 0  # the files just written
    assert s["container_fs_limit_bytes"].value.value > 0
    assert s["container_fs_inodes_total"].value.value >= s["container_fs_inodes_free"].value.value
    now = time.time()
    assert now - 600 < s["container_start_time_seconds"].value.value <= now
    assert abs(s["container_last_seen"].value.value - now) < 60

    # The pod's own series: its network interface in the guest, and the guest as a whole.
    pod_series = {m.name: m for m in mine.metrics}
    rx = pod_series["container_network_receive_bytes_total"]
    assert rx.label_values[0] == "" and rx.label_values[-1]  # container="", interface=<name>
    assert pod_series["container_memory_working_set_bytes"].value.value > 0

    # The streaming variant carries the same pod and series.
    stream = pod.cri.runtime.StreamPodSandboxMetrics(msg("StreamPodSandboxMetricsRequest"))
    streamed = [m async for r in stream for m in r.pod_sandbox_metrics]
    again = next(m for m in streamed if m.pod_sandbox_id == pod.id)
    assert ({m.name for c in again.container_metrics for m in c.metrics}
            == {m.name for c in mine.container_metrics for m in c.metrics})
    await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))


async def test_cpu_time_grows(pod: Pod) -> None:
    cid = await pod.container("burner", "sh", "-c", "while :; do :; done")
    first = _series((await pod.metrics()).container_metrics, cid)
    start = first["container_cpu_usage_seconds_total"].value.value
    deadline = time.monotonic() + 90  # whole seconds of CPU, on an emulated, shared CPU
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        now = _series((await pod.metrics()).container_metrics, cid)
        if now["container_cpu_usage_seconds_total"].value.value > start:
            break
    else:
        raise AssertionError(f"CPU time stayed at {start} s")
    assert now["container_cpu_user_seconds_total"].value.value >= 1
    await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
