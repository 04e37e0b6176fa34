"""Stats of runc containers read from the host's cgroup files, v1 (a directory per controller)
and v2 (one tree), with the cgroupfs driver's layout: a container at `<pod parent>/<id>`, the
pod at the parent. Readers return zeros for what is missing (a cgroup may go while it is read).
Every reader takes the cgroup root as an argument so that tests point it at a fake tree.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import InvalidArgument
from criserver.runtime.metric_sample import ContainerSample, InterfaceSample, PodSample
from criserver.store.records import ContainerRecord, PodRecord
from vmagent.cgroups import cgroup_dir, parse_flat_keyed, read_or_empty
from vmagent.metrics import shares_of_weight

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP2_SUPER_MAGIC = 0x63677270
# v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this big is none.
_V1_UNLIMITED = 1 << 62

_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


def cgroup_version(root: str = CGROUP_ROOT) -> int:
    """2 when root is a cgroup2 mount (the unified hierarchy), else 1 (v1 or hybrid: a tmpfs of
    per-controller mounts)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
    if _libc.statfs(os.fsencode(root), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {root}: {os.strerror(err)}")
    f_type = ctypes.c_long.from_buffer(buf).value
    return 2 if f_type == CGROUP2_SUPER_MAGIC else 1


def has_hugetlb(version: int, root: str = CGROUP_ROOT) -> bool:
    """Whether runc can set hugepage limits: the hugetlb controller is in the hierarchy runc
    uses (v1 hybrid hosts may have it on the unified mount only, where runc's v1 code does not
    look, and then fail every container that carries a limit)."""
    if version == 2:
        return "hugetlb" in read_or_empty(f"{root}/cgroup.controllers").split()
    return os.path.isdir(f"{root}/hugetlb")


def _number(text: str) -> int:
    """A single-value cgroup file: "max", "-1", v1's huge "unlimited" and junk are 0."""
    text = text.strip()
    if not text.isdigit():
        return 0
    value = int(text)
    return 0 if value >= _V1_UNLIMITED else value


@dataclass(frozen=True)
class CgroupUsage:
    """One cgroup's readings in plain units (ns, bytes, counts); 0 = none or unknown."""

    timestamp_ns: int
    exists: bool = False
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
    memory_mapped_file: int = 0
    memory_swap: int = 0
    memory_max_usage: int = 0
    memory_failcnt: int = 0
    pgfault: int = 0
    pgmajfault: int = 0
    oom_kills: int = 0
    pids: int = 0
    pids_max: int = 0
    memory_limit: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpu_shares: int = 0


def _read_v2(directory: str, now: int) -> CgroupUsage:
    def file(name: str) -> str:
        return read_or_empty(os.path.join(directory, name))

    cpu = parse_flat_keyed(file("cpu.stat"))
    mem = parse_flat_keyed(file("memory.stat"))
    events = parse_flat_keyed(file("memory.events"))
    current = _number(file("memory.current"))
    quota, _, period = file("cpu.max").strip().partition(" ")
    return CgroupUsage(
        timestamp_ns=now,
        exists=os.path.isdir(directory),
        cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        cpu_user_ns=cpu.get("user_usec", 0) * 1000,
        cpu_system_ns=cpu.get("system_usec", 0) * 1000,
        cpu_periods=cpu.get("nr_periods", 0),
        cpu_throttled_periods=cpu.get("nr_throttled", 0),
        cpu_throttled_ns=cpu.get("throttled_usec", 0) * 1000,
        memory_usage=current,
        # The kubelet's working set: usage minus the page cache the kernel can drop at once.
        memory_working_set=max(current - mem.get("inactive_file", 0), 0),
        memory_rss=mem.get("anon", 0),
        memory_cache=mem.get("file", 0),
        memory_mapped_file=mem.get("file_mapped", 0),
        memory_swap=_number(file("memory.swap.current")),
        # memory.peak is Linux 5.19+; before, the best known maximum is the current usage.
        memory_max_usage=_number(file("memory.peak")) or current,
        memory_failcnt=events.get("max", 0),
        pgfault=mem.get("pgfault", 0),
        pgmajfault=mem.get("pgmajfault", 0),
        oom_kills=events.get("oom_kill", 0),
        pids=_number(file("pids.current")),
        pids_max=_number(file("pids.max")),
        memory_limit=_number(file("memory.max")),
        cpu_quota=_number(quota),
        cpu_period=_number(period),
        cpu_shares=shares_of_weight(_number(file("cpu.weight"))),
    )


def _read_v1(path: str, root: str, now: int) -> CgroupUsage:
    def file(controller: str, name: str) -> str:
        return read_or_empty(os.path.join(cgroup_dir(path, os.path.join(root, controller)),
                                          name))

    # Hierarchical (total_*) counters: a pod's parent has no tasks of its own.
    mem = parse_flat_keyed(file("memory", "memory.stat"))
    cpu = parse_flat_keyed(file("cpu", "cpu.stat"))
    oom = parse_flat_keyed(file("memory", "memory.oom_control"))
    usage = _number(file("memory", "memory.usage_in_bytes"))
    quota = _number(file("cpu", "cpu.cfs_quota_us"))  # -1: none, read as 0
    return CgroupUsage(
        timestamp_ns=now,
        exists=any(os.path.isdir(cgroup_dir(path, os.path.join(root, c)))
                   for c in ("memory", "cpuacct", "pids")),
        cpu_usage_ns=_number(file("cpuacct", "cpuacct.usage")),
        cpu_user_ns=_number(file("cpuacct", "cpuacct.usage_user")),
        cpu_system_ns=_number(file("cpuacct", "cpuacct.usage_sys")),
        cpu_periods=cpu.get("nr_periods", 0),
        cpu_throttled_periods=cpu.get("nr_throttled", 0),
        cpu_throttled_ns=cpu.get("throttled_time", 0),
        memory_usage=usage,
        memory_working_set=max(usage - mem.get("total_inactive_file", 0), 0),
        memory_rss=mem.get("total_rss", 0),
        memory_cache=mem.get("total_cache", 0),
        memory_mapped_file=mem.get("total_mapped_file", 0),
        memory_swap=mem.get("total_swap", 0),
        memory_max_usage=_number(file("memory", "memory.max_usage_in_bytes")),
        memory_failcnt=_number(file("memory", "memory.failcnt")),
        pgfault=mem.get("total_pgfault", 0),
        pgmajfault=mem.get("total_pgmajfault", 0),
        oom_kills=oom.get("oom_kill", 0),
        pids=_number(file("pids", "pids.current")),
        pids_max=_number(file("pids", "pids.max")),
        memory_limit=_number(file("memory", "memory.limit_in_bytes")),
        cpu_quota=quota,
        cpu_period=_number(file("cpu", "cpu.cfs_period_us")),
        cpu_shares=_number(file("cpu", "cpu.shares")),
    )


def read_usage(cgroup_path: str, version: int, root: str = CGROUP_ROOT) -> CgroupUsage:
    """The readings of the cgroup at cgroup_path (the spec's linux.cgroupsPath, cgroupfs
    driver). Blocking (small reads of a memory-backed filesystem): batch a pod's reads into one
    thread."""
    now = time.time_ns()
    if version == 2:
        return _read_v2(cgroup_dir(cgroup_path, root), now)
    return _read_v1(cgroup_path, root, now)


def oom_killed(cgroup_path: str, version: int, root: str = CGROUP_ROOT) -> bool:
    """Whether the kernel OOM-killed a process of the cgroup: the container's exit reason is
    then OOMKilled (vmagent.cgroups.exit_reason). Read it before `runc delete` removes the
    cgroup. Blocking, as read_usage."""
    if version == 2:
        directory = cgroup_dir(cgroup_path, root)
        events = read_or_empty(os.path.join(directory, "memory.events"))
    else:
        directory = cgroup_dir(cgroup_path, os.path.join(root, "memory"))
        events = read_or_empty(os.path.join(directory, "memory.oom_control"))
    return parse_flat_keyed(events).get("oom_kill", 0) > 0


class NanoCores:
    """usage_nano_cores from two readings of a cumulative CPU counter, as containerd computes
    it: the previous reading of each key (container or pod id) is kept until `forget`."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def update(self, key: str, usage: CgroupUsage) -> int | None:
        """Cores used since the previous reading, in billionths; None on the first one or when
        the counter went back (a new cgroup under the same name)."""
        previous = self._last.get(key)
        self._last[key] = (usage.timestamp_ns, usage.cpu_usage_ns)
        if previous is None:
            return None
        elapsed = usage.timestamp_ns - previous[0]
        used = usage.cpu_usage_ns - previous[1]
        if elapsed <= 0 or used < 0:
            return None
        return used * 1_000_000_000 // elapsed

    def forget(self, key: str) -> None:
        self._last.pop(key, None)


def _u64(value: int) -> cri.UInt64Value:
    return cri.UInt64Value(value=max(value, 0))


def _memory(usage: CgroupUsage) -> cri.MemoryUsage:
    memory = cri.MemoryUsage(
        timestamp=usage.timestamp_ns,
        working_set_bytes=_u64(usage.memory_working_set),
        usage_bytes=_u64(usage.memory_usage),
        rss_bytes=_u64(usage.memory_rss),
        page_faults=_u64(usage.pgfault),
        major_page_faults=_u64(usage.pgmajfault))
    if usage.memory_limit:  # as the kubelet: what is left below the limit, none without one
        memory.available_bytes.value = max(usage.memory_limit - usage.memory_working_set, 0)
    return memory


def _cpu(usage: CgroupUsage, nano_cores: int | None) -> cri.CpuUsage:
    cpu = cri.CpuUsage(timestamp=usage.timestamp_ns,
                       usage_core_nano_seconds=_u64(usage.cpu_usage_ns))
    if nano_cores is not None:
        cpu.usage_nano_cores.value = nano_cores
    return cpu


def container_stats(container: ContainerRecord, usage: CgroupUsage, writable_layer_bytes: int,
                    nano_cores: int | None = None) -> cri.ContainerStats:
    """ContainerStats of a container from its cgroup's readings; the writable layer's bytes
    (rootfs.writable_layer_bytes, cached by the caller) and the CPU rate (NanoCores) are
    given."""
    return cri.ContainerStats(
        attributes=cri.ContainerAttributes(
            id=container.id, metadata=container.config.metadata,
            labels=container.config.labels, annotations=container.config.annotations),
        cpu=_cpu(usage, nano_cores),
        memory=_memory(usage),
        swap=cri.SwapUsage(timestamp=usage.timestamp_ns,
                           swap_usage_bytes=_u64(usage.memory_swap)),
        writable_layer=cri.FilesystemUsage(timestamp=usage.timestamp_ns,
                                           used_bytes=_u64(writable_layer_bytes)),
    )


def pod_stats(pod: PodRecord, usage: CgroupUsage, containers: Sequence[cri.ContainerStats],
              network: cri.NetworkUsage | None = None,
              nano_cores: int | None = None) -> cri.PodSandboxStats:
    """PodSandboxStats from the pod's parent cgroup (every container is below it), its
    containers' stats and its netns's network usage (None for a hostNetwork pod)."""
    return cri.PodSandboxStats(
        attributes=cri.PodSandboxAttributes(
            id=pod.id, metadata=pod.config.metadata, labels=pod.config.labels,
            annotations=pod.config.annotations),
        linux=cri.LinuxPodSandboxStats(
            cpu=_cpu(usage, nano_cores),
            memory=_memory(usage),
            process=cri.ProcessUsage(timestamp=usage.timestamp_ns,
                                     process_count=_u64(usage.pids)),
            containers=containers,
            network=network,
        ),
    )


def container_sample(container_id: str, usage: CgroupUsage,
                     writable_layer_bytes: int = 0) -> ContainerSample:
    """The container's part of the CRI metrics that its cgroup files give (no per-process
    counts: threads, file descriptors, sockets; no block I/O)."""
    return ContainerSample(
        container_id=container_id, timestamp_ns=usage.timestamp_ns,
        cpu_usage_ns=usage.cpu_usage_ns, cpu_user_ns=usage.cpu_user_ns,
        cpu_system_ns=usage.cpu_system_ns, cpu_periods=usage.cpu_periods,
        cpu_throttled_periods=usage.cpu_throttled_periods,
        cpu_throttled_ns=usage.cpu_throttled_ns,
        memory_usage=usage.memory_usage, memory_working_set=usage.memory_working_set,
        memory_rss=usage.memory_rss, memory_cache=usage.memory_cache,
        memory_mapped_file=usage.memory_mapped_file, memory_swap=usage.memory_swap,
        memory_max_usage=usage.memory_max_usage, memory_failcnt=usage.memory_failcnt,
        pgfault=usage.pgfault, pgmajfault=usage.pgmajfault, oom_events=usage.oom_kills,
        processes=usage.pids, threads_max=usage.pids_max, fs_usage=writable_layer_bytes,
        spec_cpu_period=usage.cpu_period, spec_cpu_quota=usage.cpu_quota,
        spec_cpu_shares=usage.cpu_shares, spec_memory_limit=usage.memory_limit,
    )


def pod_sample(usage: CgroupUsage, containers: Sequence[ContainerSample],
               interfaces: Sequence[InterfaceSample] = ()) -> PodSample:
    return PodSample(
        timestamp_ns=usage.timestamp_ns, cpu_usage_ns=usage.cpu_usage_ns,
        memory_working_set=usage.memory_working_set, processes=usage.pids,
        interfaces=list(interfaces), containers=list(containers))


def _hierarchies(version: int, root: str) -> list[str]:
    """The roots of every mounted hierarchy: v2 the one tree; v1 each controller directory
    (comounted ones once: cpu and cpuacct may be symlinks to cpu,cpuacct) and the unified
    mount of a hybrid host."""
    if version == 2:
        return [root]
    seen: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if entry.is_dir():
            seen.setdefault(os.path.realpath(entry.path), entry.path)
    return list(seen.values())


def remove_pod_cgroup(parent: str, version: int, root: str = CGROUP_ROOT) -> None:
    """Remove the pod's default parent cgroup (`/criserver/<pod id>`), children first, in
    every hierarchy where it exists. Busy cgroups (a process left) are logged and kept.
    Blocking: use a thread.

    :raises InvalidArgument: parent is not a proper absolute path below the root.
    """
    clean = posixpath.normpath(parent)
    if not parent.startswith("/") or clean in ("/", "//") or ".." in clean.split("/"):
        raise InvalidArgument(f"pod cgroup parent {parent!r} is not a path below the root")
    for hierarchy in _hierarchies(version, root):
        top = cgroup_dir(clean, hierarchy)
        if not os.path.isdir(top):
            continue
        # rmdir needs the cgroup's children gone first; its control files go with it.
        kept: list[str] = []
        for directory, _dirs, _files in os.walk(top, topdown=False):
            if any(k.startswith(directory + "/") for k in kept):
                continue  # a busy child keeps its parents: logged once, below
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                kept.append(directory)
                level = (logging.WARNING if exc.errno in (errno.EBUSY, errno.ENOTEMPTY)
                         else logging.ERROR)
                log.log(level, "pod cgroup not removed cgroup=%s error=%s", directory, exc)
