"""ListMetricDescriptors, ListPodSandboxMetrics (and its streaming variant): the CRI's metrics,
named and labelled as cAdvisor names them (what critest and kubelet's /metrics/cadvisor expect),
from one sample per pod that the backend measures (`SandboxBackend.sandbox_metrics`).

Every series carries cAdvisor's labels `container, id, image, name, namespace, pod` (some add one
or more, e.g. `interface`); the pod's own series (the whole sandbox, its network) have
`container=""`, as cAdvisor's pod cgroup has. Values are integers, as the CRI carries them:
a `_seconds` metric is whole seconds, rounded down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import NamedTuple

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import CriError
from criserver.runtime.metric_sample import ContainerSample, PodSample
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerRecord, ContainerState, PodRecord, PodState

STREAM_CHUNK = 100
NS = 1_000_000_000
BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")


class Kind(NamedTuple):
    help: str
    type: cri.MetricType
    extra_labels: tuple[str, ...] = ()


C, G = cri.COUNTER, cri.GAUGE
NET = ("interface",)
DEV = ("device",)

DESCRIPTORS: dict[str, Kind] = {
    # cpu.stat
    "container_cpu_usage_seconds_total": Kind("Cumulative cpu time consumed in seconds.", C,
                                              ("cpu",)),
    "container_cpu_user_seconds_total": Kind("Cumulative user cpu time consumed in seconds.", C),
    "container_cpu_system_seconds_total": Kind(
        "Cumulative system cpu time consumed in seconds.", C),
    "container_cpu_cfs_periods_total": Kind("Number of elapsed enforcement period intervals.", C),
    "container_cpu_cfs_throttled_periods_total": Kind("Number of throttled period intervals.", C),
    "container_cpu_cfs_throttled_seconds_total": Kind(
        "Total time duration the container has been throttled.", C),
    # memory.*
    "container_memory_usage_bytes": Kind(
        "Current memory usage in bytes, including all memory regardless of when it was "
        "accessed", G),
    "container_memory_working_set_bytes": Kind("Current working set in bytes.", G),
    "container_memory_rss": Kind("Size of RSS in bytes.", G),
    "container_memory_cache": Kind("Number of bytes of page cache memory.", G),
    "container_memory_kernel_usage": Kind("Size of kernel memory allocated in bytes.", G),
    "container_memory_mapped_file": Kind("Size of memory mapped files in bytes.", G),
    "container_memory_swap": Kind("Container swap usage in bytes.", G),
    "container_memory_max_usage_bytes": Kind("Maximum memory usage recorded in bytes", G),
    "container_memory_failcnt": Kind("Number of memory usage hits limits", G),
    "container_memory_failures_total": Kind("Cumulative count of memory allocation failures.", C,
                                            ("failure_type", "scope")),
    "container_oom_events_total": Kind(
        "Count of out of memory events observed for the container", C),
    # processes
    "container_processes": Kind("Number of processes running inside the container.", G),
    "container_threads": Kind("Number of threads running inside the container", G),
    "container_threads_max": Kind(
        "Maximum number of threads allowed inside the container, infinity if value is zero", G),
    "container_file_descriptors": Kind(
        "Number of open file descriptors for the container.", G),
    "container_sockets": Kind("Number of open sockets for the container.", G),
    # the writable layer's filesystem, and block I/O
    "container_fs_usage_bytes": Kind(
        "Number of bytes that are consumed by the container on this filesystem.", G, DEV),
    "container_fs_limit_bytes": Kind(
        "Number of bytes that can be consumed by the container on this filesystem.", G, DEV),
    "container_fs_inodes_total": Kind("Number of Inodes", G, DEV),
    "container_fs_inodes_free": Kind("Number of available Inodes", G, DEV),
    "container_fs_reads_bytes_total": Kind("Cumulative count of bytes read", C, DEV),
    "container_fs_reads_total": Kind("Cumulative count of reads completed", C, DEV),
    "container_fs_writes_bytes_total": Kind("Cumulative count of bytes written", C, DEV),
    "container_fs_writes_total": Kind("Cumulative count of writes completed", C, DEV),
    "container_blkio_device_usage_total": Kind(
        "Blkio device bytes usage", C, ("device", "major", "minor", "operation")),
    # the pod's network
    "container_network_receive_bytes_total": Kind("Cumulative count of bytes received", C, NET),
    "container_network_receive_packets_total": Kind(
        "Cumulative count of packets received", C, NET),
    "container_network_receive_packets_dropped_total": Kind(
        "Cumulative count of packets dropped while receiving", C, NET),
    "container_network_receive_errors_total": Kind(
        "Cumulative count of errors encountered while receiving", C, NET),
    "container_network_transmit_bytes_total": Kind(
        "Cumulative count of bytes transmitted", C, NET),
    "container_network_transmit_packets_total": Kind(
        "Cumulative count of packets transmitted", C, NET),
    "container_network_transmit_packets_dropped_total": Kind(
        "Cumulative count of packets dropped while transmitting", C, NET),
    "container_network_transmit_errors_total": Kind(
        "Cumulative count of errors encountered while transmitting", C, NET),
    # limits, as the cgroup applies them (0: none)
    "container_spec_cpu_period": Kind("CPU period of the container.", G),
    "container_spec_cpu_quota": Kind("CPU quota of the container.", G),
    "container_spec_cpu_shares": Kind("CPU share of the container.", G),
    "container_spec_memory_limit_bytes": Kind("Memory limit for the container.", G),
    "container_spec_memory_reservation_limit_bytes": Kind(
        "Memory reservation limit for the container.", G),
    "container_spec_memory_swap_limit_bytes": Kind("Memory swap limit for the container.", G),
    # life
    "container_start_time_seconds": Kind(
        "Start time of the container since unix epoch in seconds.", G),
    "container_last_seen": Kind("Last time a container was seen by the exporter", G),
}

Value = tuple[str, tuple[str, ...], int]  # name, extra label values, value


async def list_metric_descriptors(
    rt: Runtime, request: cri.ListMetricDescriptorsRequest
) -> cri.ListMetricDescriptorsResponse:
    return cri.ListMetricDescriptorsResponse(descriptors=[
        cri.MetricDescriptor(name=name, help=kind.help,
                             label_keys=[*BASE_LABELS, *kind.extra_labels])
        for name, kind in DESCRIPTORS.items()
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


async def _sample(rt: Runtime, pod: PodRecord) -> PodSample | None:
    try:
        return await rt.backend(pod).sandbox_metrics(pod)
    except CriError:
        return None  # stopped meanwhile, or a backend without stats: no metrics for it


async def _all(rt: Runtime) -> AsyncIterator[cri.PodSandboxMetrics]:
    pods = [p for p in rt.pods.all() if p.state == PodState.READY]
    # One round trip per pod, all pods at once: a slow guest does not hold up the others.
    samples = await asyncio.gather(*(_sample(rt, p) for p in pods))
    for pod, sample in zip(pods, samples, strict=True):
        if sample is not None:
            yield pod_metrics(pod, rt.containers.of_pod(pod.id), sample)


def pod_metrics(pod: PodRecord, containers: list[ContainerRecord], sample: PodSample
                ) -> cri.PodSandboxMetrics:
    """The pod's series and those of its running containers the sample has."""
    meta = pod.config.metadata
    running = {c.id: c for c in containers if c.state == ContainerState.RUNNING}
    out = cri.PodSandboxMetrics(pod_sandbox_id=pod.id, metrics=_metrics(
        ("", pod.id, "", pod.id, meta.namespace, meta.name), pod_values(sample),
        sample.timestamp_ns))
    for s in sample.containers:
        record = running.get(s.container_id)
        if record is None:
            continue
        image = record.config.image.user_specified_image or record.config.image.image
        base = (record.config.metadata.name, record.id, image, record.id, meta.namespace,
                meta.name)
        out.container_metrics.append(cri.ContainerMetrics(
            container_id=record.id,
            metrics=_metrics(base, container_values(s, record.started_at), s.timestamp_ns)))
    return out


def _metrics(base: tuple[str, ...], values: Iterator[Value], timestamp: int) -> list[cri.Metric]:
    return [
        cri.Metric(name=name, timestamp=timestamp, metric_type=DESCRIPTORS[name].type,
                   label_values=[*base, *extra], value=cri.UInt64Value(value=max(value, 0)))
        for name, extra, value in values
    ]


def pod_values(p: PodSample) -> Iterator[Value]:
    """The sandbox as a whole (cAdvisor's pod cgroup) and its network interfaces."""
    yield "container_cpu_usage_seconds_total", ("total",), p.cpu_usage_ns // NS
    yield "container_memory_working_set_bytes", (), p.memory_working_set
    yield "container_processes", (), p.processes
    for i in p.interfaces:
        name = (i.name,)
        yield "container_network_receive_bytes_total", name, i.rx_bytes
        yield "container_network_receive_packets_total", name, i.rx_packets
        yield "container_network_receive_packets_dropped_total", name, i.rx_dropped
        yield "container_network_receive_errors_total", name, i.rx_errors
        yield "container_network_transmit_bytes_total", name, i.tx_bytes
        yield "container_network_transmit_packets_total", name, i.tx_packets
        yield "container_network_transmit_packets_dropped_total", name, i.tx_dropped
        yield "container_network_transmit_errors_total", name, i.tx_errors


def container_values(s: ContainerSample, started_ns: int) -> Iterator[Value]:
    yield "container_cpu_usage_seconds_total", ("total",), s.cpu_usage_ns // NS
    yield "container_cpu_user_seconds_total", (), s.cpu_user_ns // NS
    yield "container_cpu_system_seconds_total", (), s.cpu_system_ns // NS
    yield "container_cpu_cfs_periods_total", (), s.cpu_periods
    yield "container_cpu_cfs_throttled_periods_total", (), s.cpu_throttled_periods
    yield "container_cpu_cfs_throttled_seconds_total", (), s.cpu_throttled_ns // NS

    yield "container_memory_usage_bytes", (), s.memory_usage
    yield "container_memory_working_set_bytes", (), s.memory_working_set
    yield "container_memory_rss", (), s.memory_rss
    yield "container_memory_cache", (), s.memory_cache
    yield "container_memory_kernel_usage", (), s.memory_kernel
    yield "container_memory_mapped_file", (), s.memory_mapped_file
    yield "container_memory_swap", (), s.memory_swap
    yield "container_memory_max_usage_bytes", (), s.memory_max_usage
    yield "container_memory_failcnt", (), s.memory_failcnt
    # cgroup v2 counts hierarchically only: both scopes are the same numbers.
    for scope in ("container", "hierarchy"):
        yield "container_memory_failures_total", ("pgfault", scope), s.pgfault
        yield "container_memory_failures_total", ("pgmajfault", scope), s.pgmajfault
    yield "container_oom_events_total", (), s.oom_events

    yield "container_processes", (), s.processes
    yield "container_threads", (), s.threads
    yield "container_threads_max", (), s.threads_max
    yield "container_file_descriptors", (), s.file_descriptors
    yield "container_sockets", (), s.sockets

    fs = (s.fs_device,)
    yield "container_fs_usage_bytes", fs, s.fs_usage
    yield "container_fs_limit_bytes", fs, s.fs_limit
    yield "container_fs_inodes_total", fs, s.fs_inodes_total
    yield "container_fs_inodes_free", fs, s.fs_inodes_free
    for io in s.io:
        dev = (io.device,)
        yield "container_fs_reads_bytes_total", dev, io.read_bytes
        yield "container_fs_reads_total", dev, io.reads
        yield "container_fs_writes_bytes_total", dev, io.write_bytes
        yield "container_fs_writes_total", dev, io.writes
        numbers = (io.device, str(io.major), str(io.minor))
        yield "container_blkio_device_usage_total", (*numbers, "Read"), io.read_bytes
        yield "container_blkio_device_usage_total", (*numbers, "Write"), io.write_bytes

    yield "container_spec_cpu_period", (), s.spec_cpu_period
    yield "container_spec_cpu_quota", (), s.spec_cpu_quota
    yield "container_spec_cpu_shares", (), s.spec_cpu_shares
    yield "container_spec_memory_limit_bytes", (), s.spec_memory_limit
    yield "container_spec_memory_reservation_limit_bytes", (), s.spec_memory_reservation
    yield "container_spec_memory_swap_limit_bytes", (), s.spec_memory_swap_limit

    yield "container_start_time_seconds", (), started_ns // NS
    yield "container_last_seen", (), (s.timestamp_ns or time.time_ns()) // NS
