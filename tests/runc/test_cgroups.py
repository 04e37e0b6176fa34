"""cgroup v1 and v2 readers on fake trees, the CRI stats and samples made of them, pod cgroup
removal, and one read of this host's real cgroup files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.runc import cgroups
from criserver.backends.runc.cgroups import CgroupUsage, NanoCores
from criserver.errors import InvalidArgument
from criserver.store.records import ContainerRecord, PodRecord

POD_PARENT = "/criserver/" + "ab" * 32
CTR = "cd" * 32
CTR_PATH = f"{POD_PARENT}/{CTR}"  # oci_spec._cgroups_path with the cgroupfs driver


def write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def fake_v2(root: Path, path: str = CTR_PATH) -> None:
    write(root / path.lstrip("/"), {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\n"
                    "nr_throttled 2\nthrottled_usec 30\n",
        "cpu.max": "50000 100000\n",
        "cpu.weight": "100\n",
        "memory.current": "10000\n",
        "memory.stat": "anon 4000\nfile 5000\nfile_mapped 700\ninactive_file 3000\n"
                       "pgfault 42\npgmajfault 3\n",
        "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        "memory.max": "1048576\n",
        "memory.peak": "20000\n",
        "memory.swap.current": "0\n",
        "pids.current": "3\n",
        "pids.max": "max\n",
    })


def fake_v1(root: Path, path: str = CTR_PATH) -> None:
    rel = path.lstrip("/")
    write(root / "cpuacct" / rel, {
        "cpuacct.usage": "1500000\n", "cpuacct.usage_user": "1000000\n",
        "cpuacct.usage_sys": "500000\n"})
    write(root / "cpu" / rel, {
        "cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 30000\n",
        "cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n", "cpu.shares": "1024\n"})
    write(root / "memory" / rel, {
        "memory.usage_in_bytes": "10000\n",
        # per-cgroup counters too: the reader must take the hierarchical total_* ones
        "memory.stat": "rss 1\ncache 1\ninactive_file 1\npgfault 1\ntotal_rss 4000\n"
                       "total_cache 5000\ntotal_mapped_file 700\ntotal_inactive_file 3000\n"
                       "total_pgfault 42\ntotal_pgmajfault 3\ntotal_swap 0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        "memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        "memory.max_usage_in_bytes": "20000\n",
        "memory.failcnt": "4\n"})
    write(root / "pids" / rel, {"pids.current": "3\n", "pids.max": "max\n"})


def test_v2_reader(tmp_path: Path) -> None:
    fake_v2(tmp_path)
    u = cgroups.read_usage(CTR_PATH, 2, str(tmp_path))
    assert u.exists
    assert (u.cpu_usage_ns, u.cpu_user_ns, u.cpu_system_ns) == (1_500_000, 1_000_000, 500_000)
    assert (u.cpu_periods, u.cpu_throttled_periods, u.cpu_throttled_ns) == (10, 2, 30_000)
    assert (u.memory_usage, u.memory_working_set, u.memory_rss) == (10000, 7000, 4000)
    assert (u.memory_cache, u.memory_mapped_file, u.memory_max_usage) == (5000, 700, 20000)
    assert (u.pgfault, u.pgmajfault, u.oom_kills, u.memory_failcnt) == (42, 3, 1, 4)
    assert (u.pids, u.pids_max, u.memory_limit) == (3, 0, 1048576)
    assert (u.cpu_quota, u.cpu_period, u.cpu_shares) == (50000, 100000, 2597)
    assert cgroups.oom_killed(CTR_PATH, 2, str(tmp_path))


def test_v1_reader(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    u = cgroups.read_usage(CTR_PATH, 1, str(tmp_path))
    assert u.exists
    assert (u.cpu_usage_ns, u.cpu_user_ns, u.cpu_system_ns) == (1_500_000, 1_000_000, 500_000)
    assert (u.cpu_periods, u.cpu_throttled_periods, u.cpu_throttled_ns) == (10, 2, 30_000)
    assert (u.memory_usage, u.memory_working_set, u.memory_rss) == (10000, 7000, 4000)
    assert (u.memory_cache, u.memory_mapped_file, u.memory_max_usage) == (5000, 700, 20000)
    assert (u.pgfault, u.pgmajfault, u.oom_kills, u.memory_failcnt) == (42, 3, 1, 4)
    assert (u.pids, u.pids_max, u.memory_limit) == (3, 0, 0)
    assert (u.cpu_quota, u.cpu_period, u.cpu_shares) == (0, 100000, 1024)
    assert cgroups.oom_killed(CTR_PATH, 1, str(tmp_path))


@pytest.mark.parametrize("version", [1, 2])
def test_working_set_floors_at_zero_and_a_missing_cgroup_reads_zero(tmp_path: Path,
                                                                    version: int) -> None:
    (fake_v1 if version == 1 else fake_v2)(tmp_path)
    name = "memory/" + CTR_PATH.lstrip("/") if version == 1 else CTR_PATH.lstrip("/")
    usage_file = "memory.usage_in_bytes" if version == 1 else "memory.current"
    (tmp_path / name / usage_file).write_text("1000\n")  # below inactive_file
    assert cgroups.read_usage(CTR_PATH, version, str(tmp_path)).memory_working_set == 0

    gone = cgroups.read_usage("/criserver/none/x", version, str(tmp_path))
    assert not gone.exists
    assert gone.cpu_usage_ns == gone.memory_usage == gone.pids == 0
    assert not cgroups.oom_killed("/criserver/none/x", version, str(tmp_path))


def test_cgroup_version_of_a_plain_directory_is_1(tmp_path: Path) -> None:
    assert cgroups.cgroup_version(str(tmp_path)) == 1


def test_nano_cores_from_two_readings() -> None:
    rates = NanoCores()
    assert rates.update("c", CgroupUsage(timestamp_ns=1_000_000_000, cpu_usage_ns=0)) is None
    # half a core for two seconds
    assert rates.update("c", CgroupUsage(timestamp_ns=3_000_000_000,
                                         cpu_usage_ns=1_000_000_000)) == 500_000_000
    # the counter went back: a new cgroup under the same name
    assert rates.update("c", CgroupUsage(timestamp_ns=4_000_000_000, cpu_usage_ns=5)) is None
    rates.forget("c")
    assert rates.update("c", CgroupUsage(timestamp_ns=5_000_000_000, cpu_usage_ns=9)) is None


def test_container_and_pod_stats(tmp_path: Path) -> None:
    fake_v2(tmp_path)
    u = cgroups.read_usage(CTR_PATH, 2, str(tmp_path))
    ctr = ContainerRecord(id=CTR, pod_id="ab" * 32, created_at=1, config=cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"), labels={"l": "1"}, annotations={"a": "2"}))
    stats = cgroups.container_stats(ctr, u, writable_layer_bytes=8192, nano_cores=250)
    assert stats.attributes.id == CTR and stats.attributes.metadata.name == "app"
    assert dict(stats.attributes.labels) == {"l": "1"}
    assert dict(stats.attributes.annotations) == {"a": "2"}
    assert stats.cpu.timestamp == u.timestamp_ns
    assert stats.cpu.usage_core_nano_seconds.value == 1_500_000
    assert stats.cpu.usage_nano_cores.value == 250
    assert stats.memory.working_set_bytes.value == 7000
    assert stats.memory.usage_bytes.value == 10000
    assert stats.memory.rss_bytes.value == 4000
    assert stats.memory.available_bytes.value == 1048576 - 7000
    assert (stats.memory.page_faults.value, stats.memory.major_page_faults.value) == (42, 3)
    assert stats.writable_layer.used_bytes.value == 8192
    assert stats.swap.HasField("swap_usage_bytes")

    unlimited = cgroups.container_stats(ctr, CgroupUsage(timestamp_ns=1), 0)
    assert not unlimited.cpu.HasField("usage_nano_cores")  # first reading: no rate yet
    assert not unlimited.memory.HasField("available_bytes")  # no limit: nothing "available"

    pod = PodRecord(id="ab" * 32, runtime_handler="runc", created_at=1,
                    config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="p")))
    pod_usage = cgroups.read_usage(POD_PARENT, 2, str(tmp_path))
    pstats = cgroups.pod_stats(pod, pod_usage, [stats])
    assert pstats.attributes.id == pod.id and pstats.attributes.metadata.name == "p"
    assert [c.attributes.id for c in pstats.linux.containers] == [CTR]
    assert pstats.linux.process.HasField("process_count")
    assert not pstats.linux.HasField("network")  # hostNetwork: no usage, not zero usage


def test_samples_carry_the_same_readings(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    u = cgroups.read_usage(CTR_PATH, 1, str(tmp_path))
    c = cgroups.container_sample(CTR, u, writable_layer_bytes=99)
    assert (c.container_id, c.cpu_usage_ns, c.memory_working_set) == (CTR, 1_500_000, 7000)
    assert (c.oom_events, c.processes, c.fs_usage, c.spec_cpu_shares) == (1, 3, 99, 1024)
    p = cgroups.pod_sample(u, [c])
    assert (p.cpu_usage_ns, p.processes, p.containers) == (1_500_000, 3, [c])


def test_remove_pod_cgroup_v1_every_hierarchy(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    for ctrl in ("cpu,cpuacct", "memory", "pids", "unified"):
        (tmp_path / ctrl / POD_PARENT.lstrip("/") / CTR).mkdir(parents=True)
    os.symlink("cpu,cpuacct", tmp_path / "cpu")  # comounted: one hierarchy, two names
    os.symlink("cpu,cpuacct", tmp_path / "cpuacct")
    (tmp_path / "blkio").mkdir()  # the pod never got a cgroup here
    busy = tmp_path / "pids" / POD_PARENT.lstrip("/") / CTR / "leftover"
    busy.mkdir()
    (busy / "task").write_text("")  # rmdir fails, as EBUSY on a cgroup with a process

    with caplog.at_level(logging.WARNING):
        cgroups.remove_pod_cgroup(POD_PARENT, 1, str(tmp_path))
    for ctrl in ("cpu,cpuacct", "memory", "unified"):
        assert not (tmp_path / ctrl / POD_PARENT.lstrip("/")).exists()
        assert (tmp_path / ctrl / "criserver").is_dir()  # the shared parent stays
    assert busy.is_dir()
    assert [r.message.count("not removed") for r in caplog.records] == [1]

    cgroups.remove_pod_cgroup(POD_PARENT, 1, str(tmp_path / "nothing"))  # no hierarchy: fine


def test_remove_pod_cgroup_v2(tmp_path: Path) -> None:
    (tmp_path / POD_PARENT.lstrip("/") / CTR).mkdir(parents=True)
    cgroups.remove_pod_cgroup(POD_PARENT, 2, str(tmp_path))
    assert not (tmp_path / POD_PARENT.lstrip("/")).exists()
    cgroups.remove_pod_cgroup(POD_PARENT, 2, str(tmp_path))  # gone already: fine


@pytest.mark.parametrize("parent", ["", "/", "//", "relative/x", "/criserver/../..", "/a/../"])
def test_remove_pod_cgroup_refuses_paths_that_are_not_below_the_root(
        tmp_path: Path, parent: str) -> None:
    (tmp_path / "keep").mkdir()
    with pytest.raises(InvalidArgument):
        cgroups.remove_pod_cgroup(parent, 2, str(tmp_path))
    assert (tmp_path / "keep").is_dir()


def test_reads_this_hosts_own_cgroup() -> None:
    """The real files of the test process's cgroup (this CI host: v1 hybrid) parse."""
    version = cgroups.cgroup_version()
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    if version == 2:
        path = next(p for h, _, p in lines if h == "0")
    else:
        path = next((p for _, ctrls, p in lines if "memory" in ctrls.split(",")), "/")
    usage = cgroups.read_usage(path, version)
    assert usage.exists
    assert usage.memory_usage > 0
    assert usage.memory_working_set <= usage.memory_usage
    assert usage.pgfault > 0
    assert isinstance(cgroups.oom_killed(path, version), bool)
    # the root always has CPU accounting, here too
    assert cgroups.read_usage("/", version).cpu_usage_ns > 0


def test_has_hugetlb_per_hierarchy(tmp_path: Path) -> None:
    # v1 hybrid: hugetlb only on the unified mount, where runc's v1 code does not look.
    write(tmp_path / "v1" / "unified", {"cgroup.controllers": "hugetlb\n"})
    assert not cgroups.has_hugetlb(1, str(tmp_path / "v1"))
    (tmp_path / "v1" / "hugetlb").mkdir()
    assert cgroups.has_hugetlb(1, str(tmp_path / "v1"))
    write(tmp_path / "v2", {"cgroup.controllers": "cpu memory pids\n"})
    assert not cgroups.has_hugetlb(2, str(tmp_path / "v2"))
    write(tmp_path / "v2", {"cgroup.controllers": "cpu memory hugetlb pids\n"})
    assert cgroups.has_hugetlb(2, str(tmp_path / "v2"))
