"""ListMetricDescriptors, ListPodSandboxMetrics (and its streaming variant): the CRI's metrics,
derived from the same stats the backends report for PodSandboxStats, so every backend with
stats has metrics too. Values are integers in the unit their names carry."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import CriError
from criserver.runtime.runtime import Runtime
from criserver.store.records import PodState

STREAM_CHUNK = 100

# name -> (help, type, how to read it from CPU/memory/filesystem usage)
CONTAINER_METRICS = {
    "container_cpu_usage_nanoseconds_total": (
        "Cumulative CPU time the container used, in nanoseconds", cri.COUNTER),
    "container_memory_working_set_bytes": (
        "Memory the container uses that cannot be reclaimed, in bytes", cri.GAUGE),
    "container_memory_usage_bytes": ("Memory the container uses, in bytes", cri.GAUGE),
    "container_memory_rss_bytes": ("Anonymous and swap cache memory, in bytes", cri.GAUGE),
    "container_fs_usage_bytes": ("Bytes used by the container's writable layer", cri.GAUGE),
}
POD_METRICS = {
    "pod_cpu_usage_nanoseconds_total": (
        "Cumulative CPU time used in the pod sandbox (its whole VM), in nanoseconds", cri.COUNTER),
    "pod_memory_working_set_bytes": ("Memory in use in the pod sandbox, in bytes", cri.GAUGE),
    "pod_memory_available_bytes": ("Memory available in the pod sandbox, in bytes", cri.GAUGE),
    "pod_processes": ("Processes running in the pod sandbox", cri.GAUGE),
}


async def list_metric_descriptors(
    rt: Runtime, request: cri.ListMetricDescriptorsRequest
) -> cri.ListMetricDescriptorsResponse:
    return cri.ListMetricDescriptorsResponse(descriptors=[
        cri.MetricDescriptor(name=name, help=help_text)
        for name, (help_text, _) in (CONTAINER_METRICS | POD_METRICS).items()
    ])


async def list_pod_sandbox_metrics(
    rt: Runtime, request: cri.ListPodSandboxMetricsRequest
) -> cri.ListPodSandboxMetricsResponse:
    return cri.ListPodSandboxMetricsResponse(pod_metrics=[m async for m in _all(rt)])


async def stream_pod_sandbox_metrics(
    rt: Runtime, request: cri.StreamPodSandboxMetricsRequest
) -> AsyncIterator[cri.StreamPodSandboxMetricsResponse]:
    chunk: list[cri.PodSandboxMetrics] = []
    async for metrics in _all(rt):
        chunk.append(metrics)
        if len(chunk) == STREAM_CHUNK:
            yield cri.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=chunk)
            chunk = []
    if chunk:
        yield cri.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=chunk)


async def _all(rt: Runtime) -> AsyncIterator[cri.PodSandboxMetrics]:
    for pod in list(rt.pods.all()):
        if pod.state != PodState.READY:
            continue
        try:
            stats = await rt.backend(pod).sandbox_stats(pod)
        except CriError:
            continue  # stopped meanwhile, or a backend without stats: no metrics for it
        yield _pod_metrics(pod.id, stats)


def _pod_metrics(pod_id: str, stats: cri.PodSandboxStats) -> cri.PodSandboxMetrics:
    linux = stats.linux
    now = linux.cpu.timestamp or time.time_ns()
    values = {
        "pod_cpu_usage_nanoseconds_total": linux.cpu.usage_core_nano_seconds.value,
        "pod_memory_working_set_bytes": linux.memory.working_set_bytes.value,
        "pod_memory_available_bytes": linux.memory.available_bytes.value,
        "pod_processes": linux.process.process_count.value,
    }
    return cri.PodSandboxMetrics(
        pod_sandbox_id=pod_id,
        metrics=_metrics(POD_METRICS, values, now),
        container_metrics=[
            cri.ContainerMetrics(container_id=c.attributes.id, metrics=_metrics(
                CONTAINER_METRICS, {
                    "container_cpu_usage_nanoseconds_total": c.cpu.usage_core_nano_seconds.value,
                    "container_memory_working_set_bytes": c.memory.working_set_bytes.value,
                    "container_memory_usage_bytes": c.memory.usage_bytes.value,
                    "container_memory_rss_bytes": c.memory.rss_bytes.value,
                    "container_fs_usage_bytes": c.writable_layer.used_bytes.value,
                }, c.cpu.timestamp or now))
            for c in linux.containers
        ],
    )


def _metrics(kinds: Mapping[str, tuple[str, cri.MetricType]], values: dict[str, int], now: int
             ) -> list[cri.Metric]:
    return [
        cri.Metric(name=name, timestamp=now, metric_type=kinds[name][1],
                   value=cri.UInt64Value(value=value))
        for name, value in values.items()
    ]
