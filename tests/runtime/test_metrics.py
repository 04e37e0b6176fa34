"""The CRI metrics mapping (criserver/runtime/metrics.py, metric_sample.py and the micro-VM
backend's guest_metrics.py): descriptors and series as critest's metrics specs check them
(cri-tools pkg/validate/pod.go), units and labels as cAdvisor gives them."""

from __future__ import annotations

import asyncio

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.guest_metrics import pod_sample
from criserver.runtime import metrics
from criserver.runtime.metric_sample import (
    BlockIoSample,
    ContainerSample,
    InterfaceSample,
    PodSample,
    from_stats,
)
from criserver.store.records import ContainerRecord, ContainerState, PodRecord
from vmagent.api import agent_pb2 as pb

# cri-tools v1.37.0, pkg/validate/pod.go: expectedMetricDescriptorNames.
CRITEST_EXPECTED = {
    "container_blkio_device_usage_total", "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total", "container_cpu_cfs_throttled_seconds_total",
    "container_cpu_system_seconds_total", "container_cpu_usage_seconds_total",
    "container_cpu_user_seconds_total", "container_file_descriptors",
    "container_fs_inodes_free", "container_fs_inodes_total", "container_fs_limit_bytes",
    "container_fs_reads_bytes_total", "container_fs_reads_total", "container_fs_usage_bytes",
    "container_fs_writes_bytes_total", "container_fs_writes_total",
    "container_hugetlb_max_usage_bytes", "container_hugetlb_usage_bytes",
    "container_last_seen", "container_memory_cache", "container_memory_failcnt",
    "container_memory_failures_total", "container_memory_kernel_usage",
    "container_memory_mapped_file", "container_memory_max_usage_bytes", "container_memory_rss",
    "container_memory_swap", "container_memory_usage_bytes",
    "container_memory_working_set_bytes", "container_network_receive_bytes_total",
    "container_network_receive_errors_total", "container_network_receive_packets_dropped_total",
    "container_network_receive_packets_total", "container_network_transmit_bytes_total",
    "container_network_transmit_errors_total",
    "container_network_transmit_packets_dropped_total",
    "container_network_transmit_packets_total", "container_oom_events_total",
    "container_pressure_cpu_stalled_seconds_total",
    "container_pressure_cpu_waiting_seconds_total",
    "container_pressure_io_stalled_seconds_total", "container_pressure_io_waiting_seconds_total",
    "container_pressure_memory_stalled_seconds_total",
    "container_pressure_memory_waiting_seconds_total", "container_processes",
    "container_sockets", "container_spec_cpu_period", "container_spec_cpu_quota",
    "container_spec_cpu_shares", "container_spec_memory_limit_bytes",
    "container_spec_memory_reservation_limit_bytes", "container_spec_memory_swap_limit_bytes",
    "container_start_time_seconds", "container_threads", "container_threads_max",
    "container_ulimits_soft",
}
# Allowed to be missing (unimplemented by some runtimes) or without values (no block I/O).
CRITEST_UNIMPLEMENTED = {
    "container_hugetlb_max_usage_bytes", "container_hugetlb_usage_bytes",
    "container_pressure_cpu_stalled_seconds_total",
    "container_pressure_cpu_waiting_seconds_total",
    "container_pressure_io_stalled_seconds_total", "container_pressure_io_waiting_seconds_total",
    "container_pressure_memory_stalled_seconds_total",
    "container_pressure_memory_waiting_seconds_total", "container_spec_cpu_quota",
    "container_spec_memory_reservation_limit_bytes", "container_ulimits_soft",
}
CRITEST_OPTIONAL_VALUES = {
    "container_blkio_device_usage_total", "container_fs_reads_bytes_total",
    "container_fs_reads_total", "container_fs_writes_bytes_total", "container_fs_writes_total",
}


def check_like_critest(descriptors: list[cri.MetricDescriptor],
                       pod: cri.PodSandboxMetrics) -> None:
    """testMetricDescriptors and testPodSandboxMetrics, as Go critest runs them."""
    by_name = {d.name: d for d in descriptors}
    for d in descriptors:
        assert d.help and d.label_keys, d.name
    assert CRITEST_EXPECTED - CRITEST_UNIMPLEMENTED <= set(by_name)
    found: dict[str, list[str]] = {}
    for m in [*pod.metrics, *(m for c in pod.container_metrics for m in c.metrics)]:
        if not found.get(m.name):
            found[m.name] = list(m.label_values)
    missing = {n for n in CRITEST_EXPECTED if not found.get(n)}
    assert missing <= CRITEST_UNIMPLEMENTED | CRITEST_OPTIONAL_VALUES
    for d in descriptors:
        if d.name not in found:
            assert d.name in CRITEST_UNIMPLEMENTED | CRITEST_OPTIONAL_VALUES, d.name
        else:
            assert len(found[d.name]) == len(d.label_keys), d.name


def _descriptors() -> list[cri.MetricDescriptor]:
    reply = asyncio.run(metrics.list_metric_descriptors(
        None, cri.ListMetricDescriptorsRequest()))  # type: ignore[arg-type]
    return list(reply.descriptors)


def _records() -> tuple[PodRecord, list[ContainerRecord]]:
    pod = PodRecord(id="p" * 64, config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
        name="web", namespace="shop", uid="u1")), runtime_handler="", created_at=1)
    containers = [
        ContainerRecord(
            id=cid, pod_id=pod.id, created_at=1, state=state, started_at=1_700_000_000_900_000_000,
            config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                       image=cri.ImageSpec(image="sha256:" + "0" * 64,
                                                           user_specified_image="busybox:1")))
        for cid, name, state in (("c" * 64, "app", ContainerState.RUNNING),
                                 ("d" * 64, "done", ContainerState.EXITED))]
    return pod, containers


def _sample() -> PodSample:
    app = ContainerSample(
        container_id="c" * 64, timestamp_ns=1_700_000_100_500_000_000, cpu_usage_ns=3_999_999_999,
        cpu_user_ns=2_500_000_000, memory_usage=5000, memory_working_set=4000, processes=2,
        threads=3, pgfault=10, pgmajfault=1, fs_device="tmpfs", fs_usage=8192,
        io=[BlockIoSample(device="/dev/vda", major=254, minor=0, read_bytes=4096, reads=1)],
        spec_memory_limit=64 << 20)
    done = ContainerSample(container_id="d" * 64, timestamp_ns=1)
    return PodSample(timestamp_ns=1_700_000_100_000_000_000, cpu_usage_ns=7 * 10**9,
                     memory_working_set=10 << 20, processes=30,
                     interfaces=[InterfaceSample(name="eth0", rx_bytes=100, tx_packets=3)],
                     containers=[app, done])


def test_descriptors_have_help_and_cadvisor_labels() -> None:
    descriptors = _descriptors()
    for d in descriptors:
        assert list(d.label_keys[:6]) == ["container", "id", "image", "name", "namespace", "pod"]
    keys = {d.name: list(d.label_keys[6:]) for d in descriptors}
    assert keys["container_network_receive_bytes_total"] == ["interface"]
    assert keys["container_cpu_usage_seconds_total"] == ["cpu"]
    assert keys["container_memory_failures_total"] == ["failure_type", "scope"]
    assert keys["container_fs_usage_bytes"] == ["device"]
    assert keys["container_processes"] == []


def test_pod_metrics_pass_critest_checks() -> None:
    pod, containers = _records()
    out = metrics.pod_metrics(pod, containers, _sample())
    check_like_critest(_descriptors(), out)
    # Every series the mapping can make is described, with as many labels as keys.
    keys = {d.name: len(d.label_keys) for d in _descriptors()}
    for m in [*out.metrics, *out.container_metrics[0].metrics]:
        assert len(m.label_values) == keys[m.name], m.name


def test_pod_metrics_values_and_labels() -> None:
    pod, containers = _records()
    out = metrics.pod_metrics(pod, containers, _sample())
    assert out.pod_sandbox_id == pod.id
    # Only running containers: the exited one has no cgroup to measure.
    [app] = out.container_metrics
    assert app.container_id == "c" * 64

    def series(ms: list[cri.Metric], name: str) -> list[cri.Metric]:
        return [m for m in ms if m.name == name]

    [cpu] = series(list(app.metrics), "container_cpu_usage_seconds_total")
    assert list(cpu.label_values) == ["app", "c" * 64, "busybox:1", "c" * 64, "shop", "web",
                                      "total"]
    assert cpu.value.value == 3 and cpu.metric_type == cri.COUNTER  # whole seconds, down
    assert cpu.timestamp == 1_700_000_100_500_000_000
    [ws] = series(list(app.metrics), "container_memory_working_set_bytes")
    assert ws.value.value == 4000 and ws.metric_type == cri.GAUGE
    [started] = series(list(app.metrics), "container_start_time_seconds")
    assert started.value.value == 1_700_000_000
    [seen] = series(list(app.metrics), "container_last_seen")
    assert seen.value.value == 1_700_000_100
    failures = series(list(app.metrics), "container_memory_failures_total")
    assert {(tuple(m.label_values[6:]), m.value.value) for m in failures} == {
        (("pgfault", "container"), 10), (("pgmajfault", "container"), 1),
        (("pgfault", "hierarchy"), 10), (("pgmajfault", "hierarchy"), 1)}
    blkio = series(list(app.metrics), "container_blkio_device_usage_total")
    assert {tuple(m.label_values[6:]): m.value.value for m in blkio} == {
        ("/dev/vda", "254", "0", "Read"): 4096, ("/dev/vda", "254", "0", "Write"): 0}
    [fs] = series(list(app.metrics), "container_fs_usage_bytes")
    assert fs.label_values[6] == "tmpfs" and fs.value.value == 8192

    # The pod's own series: the sandbox as a whole, container="", and its network.
    [rx] = series(list(out.metrics), "container_network_receive_bytes_total")
    assert list(rx.label_values) == ["", pod.id, "", pod.id, "shop", "web", "eth0"]
    assert rx.value.value == 100
    [pod_cpu] = series(list(out.metrics), "container_cpu_usage_seconds_total")
    assert pod_cpu.value.value == 7


def test_backends_with_stats_only_still_have_the_basic_metrics() -> None:
    stats = cri.PodSandboxStats(linux=cri.LinuxPodSandboxStats(
        cpu=cri.CpuUsage(timestamp=5, usage_core_nano_seconds=cri.UInt64Value(value=2 * 10**9)),
        memory=cri.MemoryUsage(working_set_bytes=cri.UInt64Value(value=77)),
        network=cri.NetworkUsage(default_interface=cri.NetworkInterfaceUsage(
            name="eth0", rx_bytes=cri.UInt64Value(value=9))),
        containers=[cri.ContainerStats(
            attributes=cri.ContainerAttributes(id="c" * 64),
            cpu=cri.CpuUsage(timestamp=6, usage_core_nano_seconds=cri.UInt64Value(value=10**9)),
            memory=cri.MemoryUsage(working_set_bytes=cri.UInt64Value(value=55)),
            writable_layer=cri.FilesystemUsage(used_bytes=cri.UInt64Value(value=4096)))]))
    sample = from_stats(stats)
    assert (sample.timestamp_ns, sample.cpu_usage_ns, sample.memory_working_set) == (
        5, 2 * 10**9, 77)
    assert [(i.name, i.rx_bytes) for i in sample.interfaces] == [("eth0", 9)]
    [c] = sample.containers
    assert (c.container_id, c.cpu_usage_ns, c.memory_working_set, c.fs_usage) == (
        "c" * 64, 10**9, 55, 4096)
    pod, containers = _records()
    out = metrics.pod_metrics(pod, containers, sample)
    keys = {d.name: len(d.label_keys) for d in _descriptors()}
    for m in [*out.metrics, *out.container_metrics[0].metrics]:
        assert len(m.label_values) == keys[m.name], m.name


def test_guest_stats_become_the_sample() -> None:
    reply = pb.StatsResponse(
        guest=pb.GuestStats(timestamp_unix_nanos=9, memory_total_bytes=100,
                            memory_available_bytes=40, cpu_usage_nanos=5, processes=12),
        interfaces=[pb.InterfaceStats(name="eth0", rx_bytes=1, rx_packets=2, rx_errors=3,
                                      rx_dropped=4, tx_bytes=5, tx_packets=6, tx_errors=7,
                                      tx_dropped=8)],
        containers=[pb.ContainerStats(
            container_id="c1", timestamp_unix_nanos=10, cpu_usage_nanos=11,
            memory_usage_bytes=12, memory_working_set_bytes=13, memory_rss_bytes=14, pids=1,
            writable_layer_bytes=15, details=pb.ContainerDetails(
                cpu_user_nanos=16, processes=1, threads=2, sockets=1, file_descriptors=4,
                fs_device="tmpfs", fs_limit_bytes=17, spec_memory_limit_bytes=18,
                spec_cpu_shares=1024,
                io=[pb.BlockIo(device="/dev/vda", major=254, read_bytes=19)]))])
    s = pod_sample(reply)
    assert (s.timestamp_ns, s.cpu_usage_ns, s.memory_working_set, s.processes) == (9, 5, 60, 12)
    [i] = s.interfaces
    assert (i.rx_bytes, i.rx_packets, i.rx_errors, i.rx_dropped) == (1, 2, 3, 4)
    assert (i.tx_bytes, i.tx_packets, i.tx_errors, i.tx_dropped) == (5, 6, 7, 8)
    [c] = s.containers
    assert (c.container_id, c.timestamp_ns, c.cpu_usage_ns, c.cpu_user_ns) == ("c1", 10, 11, 16)
    assert (c.memory_usage, c.memory_working_set, c.memory_rss) == (12, 13, 14)
    assert (c.processes, c.threads, c.sockets, c.file_descriptors) == (1, 2, 1, 4)
    assert (c.fs_device, c.fs_usage, c.fs_limit) == ("tmpfs", 15, 17)
    assert (c.spec_memory_limit, c.spec_cpu_shares) == (18, 1024)
    assert [(b.device, b.major, b.read_bytes) for b in c.io] == [("/dev/vda", 254, 19)]
