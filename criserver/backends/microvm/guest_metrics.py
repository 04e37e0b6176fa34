"""The agent's Stats answer as CRI stats (PodSandboxStats, ContainerStats) and, asked with
`details`, as the backend-neutral sample the CRI metrics are made of: the guest as the pod, each
container's cgroup and processes, the pod's network."""

from __future__ import annotations

import time

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.net_usage import interface_samples, network_usage
from criserver.runtime.metric_sample import (
    BlockIoSample,
    ContainerSample,
    PodSample,
)
from criserver.store.records import ContainerRecord, PodRecord
from vmagent.api import agent_pb2 as pb


def pod_stats(pod: PodRecord, reply: pb.StatsResponse) -> cri.PodSandboxStats:
    """PodSandboxStats: the guest is the pod."""
    guest = reply.guest
    now = guest.timestamp_unix_nanos or time.time_ns()
    return cri.PodSandboxStats(
        attributes=cri.PodSandboxAttributes(
            id=pod.id, metadata=pod.config.metadata, labels=pod.config.labels,
            annotations=pod.config.annotations),
        linux=cri.LinuxPodSandboxStats(
            cpu=cri.CpuUsage(timestamp=now, usage_core_nano_seconds=cri.UInt64Value(
                value=guest.cpu_usage_nanos)),
            memory=cri.MemoryUsage(
                timestamp=now,
                working_set_bytes=cri.UInt64Value(
                    value=max(guest.memory_total_bytes - guest.memory_available_bytes, 0)),
                available_bytes=cri.UInt64Value(value=guest.memory_available_bytes)),
            process=cri.ProcessUsage(timestamp=now, process_count=cri.UInt64Value(
                value=guest.processes)),
            containers=[container_stats(s, None) for s in reply.containers],
            network=network_usage(reply.interfaces, now),
        ),
    )


def container_stats(stats: pb.ContainerStats, container: ContainerRecord | None
                     ) -> cri.ContainerStats:
    now = stats.timestamp_unix_nanos or time.time_ns()
    attributes = cri.ContainerAttributes(id=stats.container_id)
    if container is not None:
        attributes = cri.ContainerAttributes(
            id=container.id, metadata=container.config.metadata,
            labels=container.config.labels, annotations=container.config.annotations)
    return cri.ContainerStats(
        attributes=attributes,
        cpu=cri.CpuUsage(timestamp=now, usage_core_nano_seconds=cri.UInt64Value(
            value=stats.cpu_usage_nanos)),
        memory=cri.MemoryUsage(
            timestamp=now,
            working_set_bytes=cri.UInt64Value(value=stats.memory_working_set_bytes),
            usage_bytes=cri.UInt64Value(value=stats.memory_usage_bytes),
            rss_bytes=cri.UInt64Value(value=stats.memory_rss_bytes)),
        writable_layer=cri.FilesystemUsage(
            timestamp=now, used_bytes=cri.UInt64Value(value=stats.writable_layer_bytes)),
    )


def pod_sample(reply: pb.StatsResponse) -> PodSample:
    guest = reply.guest
    return PodSample(
        timestamp_ns=guest.timestamp_unix_nanos or time.time_ns(),
        cpu_usage_ns=guest.cpu_usage_nanos,
        memory_working_set=max(guest.memory_total_bytes - guest.memory_available_bytes, 0),
        processes=guest.processes,
        interfaces=interface_samples(reply.interfaces),
        containers=[container_sample(c) for c in reply.containers],
    )


def container_sample(c: pb.ContainerStats) -> ContainerSample:
    d = c.details
    return ContainerSample(
        container_id=c.container_id, timestamp_ns=c.timestamp_unix_nanos or time.time_ns(),
        cpu_usage_ns=c.cpu_usage_nanos, cpu_user_ns=d.cpu_user_nanos,
        cpu_system_ns=d.cpu_system_nanos, cpu_periods=d.cpu_periods,
        cpu_throttled_periods=d.cpu_throttled_periods, cpu_throttled_ns=d.cpu_throttled_nanos,
        memory_usage=c.memory_usage_bytes, memory_working_set=c.memory_working_set_bytes,
        memory_rss=c.memory_rss_bytes, memory_cache=d.memory_cache_bytes,
        memory_kernel=d.memory_kernel_bytes, memory_mapped_file=d.memory_mapped_file_bytes,
        memory_swap=d.memory_swap_bytes, memory_max_usage=d.memory_max_usage_bytes,
        memory_failcnt=d.memory_failcnt, pgfault=d.memory_pgfault,
        pgmajfault=d.memory_pgmajfault, oom_events=d.oom_events,
        processes=d.processes, threads=d.threads, threads_max=d.threads_max,
        file_descriptors=d.file_descriptors, sockets=d.sockets,
        fs_device=d.fs_device, fs_usage=c.writable_layer_bytes, fs_limit=d.fs_limit_bytes,
        fs_inodes_total=d.fs_inodes_total, fs_inodes_free=d.fs_inodes_free,
        io=[BlockIoSample(device=b.device, major=b.major, minor=b.minor,
                          read_bytes=b.read_bytes, write_bytes=b.write_bytes, reads=b.reads,
                          writes=b.writes) for b in d.io],
        spec_cpu_period=d.spec_cpu_period, spec_cpu_quota=d.spec_cpu_quota,
        spec_cpu_shares=d.spec_cpu_shares, spec_memory_limit=d.spec_memory_limit_bytes,
        spec_memory_reservation=d.spec_memory_reservation_bytes,
        spec_memory_swap_limit=d.spec_memory_swap_limit_bytes,
    )
