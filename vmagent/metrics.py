"""What the CRI metrics report beyond Stats, measured in the guest: a container's cgroup v2 files
(cpu.stat, memory.*, pids.*, io.stat, the limits), its processes' threads, file descriptors and
sockets, the filesystem of its writable layer, and the pod's network counters.
Every reader takes its roots as arguments (tests point them at a tmp dir) and returns zeros for
what is missing: a container that just exited has no cgroup left. Blocking: call from a thread.
"""

from __future__ import annotations

import os

from vmagent.api import agent_pb2 as pb
from vmagent.cgroups import parse_flat_keyed, read_or_empty

PROC = "/proc"
SYS = "/sys"


def _limit(text: str) -> int:
    """A cgroup limit file's value; "max" (no limit) and anything unreadable are 0."""
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


def cgroup_pids(cgroup: str) -> list[int]:
    procs = read_or_empty(os.path.join(cgroup, "cgroup.procs"))
    return [int(p) for p in procs.split() if p.isdigit()]


def shares_of_weight(weight: int) -> int:
    """cpu.weight back to CPU shares, inverting the conversion runc applies (as cAdvisor does)."""
    return 2 + (weight - 1) * 262142 // 9999 if weight > 0 else 0


def kernel_memory(mem: dict[str, int]) -> int:
    """memory.stat's "kernel" (Linux 5.18+), or the sum of what it stands for on older kernels."""
    if "kernel" in mem:
        return mem["kernel"]
    return sum(mem.get(k, 0) for k in (
        "kernel_stack", "pagetables", "sec_pagetables", "percpu", "sock", "vmalloc", "slab"))


def fill_cgroup(d: pb.ContainerDetails, cgroup: str) -> None:
    """Everything the cgroup's own files say."""
    def file(name: str) -> str:
        return read_or_empty(os.path.join(cgroup, name))

    cpu = parse_flat_keyed(file("cpu.stat"))
    d.cpu_user_nanos = cpu.get("user_usec", 0) * 1000
    d.cpu_system_nanos = cpu.get("system_usec", 0) * 1000
    d.cpu_periods = cpu.get("nr_periods", 0)
    d.cpu_throttled_periods = cpu.get("nr_throttled", 0)
    d.cpu_throttled_nanos = cpu.get("throttled_usec", 0) * 1000

    mem = parse_flat_keyed(file("memory.stat"))
    events = parse_flat_keyed(file("memory.events"))
    d.memory_cache_bytes = mem.get("file", 0)
    d.memory_kernel_bytes = kernel_memory(mem)
    d.memory_mapped_file_bytes = mem.get("file_mapped", 0)
    d.memory_swap_bytes = _limit(file("memory.swap.current"))
    # memory.peak is Linux 5.19+; before, the best known maximum is the current usage.
    d.memory_max_usage_bytes = _limit(file("memory.peak")) or _limit(file("memory.current"))
    d.memory_failcnt = events.get("max", 0)  # times usage hit memory.max
    d.memory_pgfault = mem.get("pgfault", 0)
    d.memory_pgmajfault = mem.get("pgmajfault", 0)
    d.oom_events = events.get("oom_kill", 0)
    d.threads_max = _limit(file("pids.max"))

    quota, _, period = file("cpu.max").strip().partition(" ")
    d.spec_cpu_quota = _limit(quota)
    d.spec_cpu_period = _limit(period)
    d.spec_cpu_shares = shares_of_weight(_limit(file("cpu.weight")))
    memory_max = _limit(file("memory.max"))
    d.spec_memory_limit_bytes = memory_max
    d.spec_memory_reservation_bytes = _limit(file("memory.low"))
    swap_max = file("memory.swap.max").strip()
    # cAdvisor's swap limit is memory plus swap; none when either is unlimited.
    d.spec_memory_swap_limit_bytes = (
        memory_max + int(swap_max) if memory_max and swap_max.isdigit() else 0)


def fill_processes(d: pb.ContainerDetails, pids: list[int], proc: str = PROC) -> None:
    """Processes, their threads, open file descriptors and the sockets among them."""
    d.processes = len(pids)
    for pid in pids:
        base = os.path.join(proc, str(pid))
        d.threads += _count(os.path.join(base, "task"))
        fd_dir = os.path.join(base, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # exited meanwhile
        d.file_descriptors += len(fds)
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)).startswith("socket:["):
                    d.sockets += 1
            except OSError:
                continue


def mount_source(path: str, mountinfo: str) -> str:
    """The source of the mount holding `path` (the longest mount point above it)."""
    best, source = "", ""
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, extra = fields.split(), tail.split()
        if len(parts) < 5 or len(extra) < 2:
            continue
        point = parts[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, source = point, extra[1]
    return source


def fill_filesystem(d: pb.ContainerDetails, path: str, proc: str = PROC) -> None:
    """Size and inodes of the filesystem the writable layer lives on (statvfs)."""
    if not path:
        return
    try:
        st = os.statvfs(path)
    except OSError:
        return
    d.fs_device = mount_source(path, read_or_empty(os.path.join(proc, "self", "mountinfo")))
    d.fs_limit_bytes = st.f_blocks * st.f_frsize
    d.fs_inodes_total = st.f_files
    d.fs_inodes_free = st.f_ffree


def device_name(major: int, minor: int, sys: str = SYS) -> str:
    uevent = read_or_empty(os.path.join(sys, "dev", "block", f"{major}:{minor}", "uevent"))
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            return f"/dev/{value}"
    return f"{major}:{minor}"


def block_io(cgroup: str, sys: str = SYS) -> list[pb.BlockIo]:
    """io.stat: one entry per device, "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ..."."""
    out = []
    for line in read_or_empty(os.path.join(cgroup, "io.stat")).splitlines():
        dev, *pairs = line.split()
        major, _, minor = dev.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        values = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if value.isdigit():
                values[key] = int(value)
        out.append(pb.BlockIo(
            device=device_name(int(major), int(minor), sys), major=int(major), minor=int(minor),
            read_bytes=values.get("rbytes", 0), write_bytes=values.get("wbytes", 0),
            reads=values.get("rios", 0), writes=values.get("wios", 0)))
    return out


def container_details(cgroup: str, layer: str, proc: str = PROC, sys: str = SYS
                      ) -> pb.ContainerDetails:
    """All of a container's details: its cgroup directory and its writable layer's path."""
    d = pb.ContainerDetails()
    if cgroup:
        fill_cgroup(d, cgroup)
        fill_processes(d, cgroup_pids(cgroup), proc)
        d.io.extend(block_io(cgroup, sys))
    fill_filesystem(d, layer, proc)
    return d


def interfaces(pid: int | str = "self", proc: str = PROC) -> list[pb.InterfaceStats]:
    """/proc/<pid>/net/dev: the counters of every interface of that process's network
    namespace but loopback."""
    out = []
    for line in read_or_empty(os.path.join(proc, str(pid), "net", "dev")).splitlines()[2:]:
        name, _, rest = line.partition(":")
        name = name.strip()
        v = [int(x) for x in rest.split() if x.isdigit()]
        if not name or name == "lo" or len(v) < 12:
            continue
        out.append(pb.InterfaceStats(
            name=name, rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2], rx_dropped=v[3],
            tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10], tx_dropped=v[11]))
    return out
