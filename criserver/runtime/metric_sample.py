"""What a backend measures of a pod for the CRI metrics, in plain units (nanoseconds, bytes,
counts); criserver/runtime/metrics.py names it the way cAdvisor does. A backend fills what it
can: zero means "not measured" or "no limit". Backends without their own give the sample
`from_stats` makes of their PodSandboxStats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from criserver.api.runtime.v1 import api_pb2 as cri


@dataclass
class InterfaceSample:
    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


@dataclass
class BlockIoSample:
    device: str
    major: int = 0
    minor: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    reads: int = 0
    writes: int = 0


@dataclass
class ContainerSample:
    container_id: str
    timestamp_ns: int
    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    cpu_periods: int = 0
    cpu_throttled_periods: int = 0
    cpu_throttled_ns: int = 0
    memory_usage: int = 0
    memory_working_set: int = 0
    memory_rss: int = 0
    memory_cache: int = 0
    memory_kernel: int = 0
    memory_mapped_file: int = 0
    memory_swap: int = 0
    memory_max_usage: int = 0
    memory_failcnt: int = 0
    pgfault: int = 0
    pgmajfault: int = 0
    oom_events: int = 0
    processes: int = 0
    threads: int = 0
    threads_max: int = 0
    file_descriptors: int = 0
    sockets: int = 0
    fs_device: str = ""
    fs_usage: int = 0
    fs_limit: int = 0
    fs_inodes_total: int = 0
    fs_inodes_free: int = 0
    io: list[BlockIoSample] = field(default_factory=list)
    spec_cpu_period: int = 0
    spec_cpu_quota: int = 0
    spec_cpu_shares: int = 0
    spec_memory_limit: int = 0
    spec_memory_reservation: int = 0
    spec_memory_swap_limit: int = 0


@dataclass
class PodSample:
    """The whole sandbox (for a VM: the guest) and each of its containers."""

    timestamp_ns: int
    cpu_usage_ns: int = 0
    memory_working_set: int = 0
    processes: int = 0
    interfaces: list[InterfaceSample] = field(default_factory=list)
    containers: list[ContainerSample] = field(default_factory=list)


def from_stats(stats: cri.PodSandboxStats) -> PodSample:
    """The part of the metrics a PodSandboxStats answer carries."""
    linux = stats.linux
    now = linux.cpu.timestamp or time.time_ns()
    network = linux.network
    links = ([network.default_interface] if network.HasField("default_interface") else [])
    return PodSample(
        timestamp_ns=now,
        cpu_usage_ns=linux.cpu.usage_core_nano_seconds.value,
        memory_working_set=linux.memory.working_set_bytes.value,
        processes=linux.process.process_count.value,
        interfaces=[InterfaceSample(
            name=i.name, rx_bytes=i.rx_bytes.value, rx_errors=i.rx_errors.value,
            tx_bytes=i.tx_bytes.value, tx_errors=i.tx_errors.value)
            for i in [*links, *network.interfaces]],
        containers=[ContainerSample(
            container_id=c.attributes.id, timestamp_ns=c.cpu.timestamp or now,
            cpu_usage_ns=c.cpu.usage_core_nano_seconds.value,
            memory_usage=c.memory.usage_bytes.value,
            memory_working_set=c.memory.working_set_bytes.value,
            memory_rss=c.memory.rss_bytes.value,
            pgfault=c.memory.page_faults.value, pgmajfault=c.memory.major_page_faults.value,
            memory_swap=c.swap.swap_usage_bytes.value,
            fs_usage=c.writable_layer.used_bytes.value) for c in linux.containers],
    )
