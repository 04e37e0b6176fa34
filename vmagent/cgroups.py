"""Reading a container's cgroup v2 files in the guest: OOM kills (memory.events) for exit
reasons and usage (cpu.stat, memory.current, memory.stat, pids.current) for Stats.
cgroupfs is memory-backed, so these small reads are done inline on the event loop.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_dir(cgroups_path: str, root: str = CGROUP_ROOT) -> str:
    return os.path.join(root, cgroups_path.lstrip("/"))


def read_or_empty(path: str) -> str:
    """A cgroup or proc file's text; "" when it is gone or unreadable (a process or cgroup
    may end while it is read)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def parse_flat_keyed(text: str) -> dict[str, int]:
    """"key value" lines (memory.events, cpu.stat, memory.stat) into a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _single(path: str) -> int:
    text = read_or_empty(path).strip()
    return int(text) if text.isdigit() else 0


def oom_kills(directory: str) -> int:
    events = parse_flat_keyed(read_or_empty(os.path.join(directory, "memory.events")))
    return events.get("oom_kill", 0)


class Usage:
    __slots__ = ("cpu_usage_ns", "memory_rss", "memory_usage", "memory_working_set", "pids")

    def __init__(self, cpu_usage_ns: int, memory_usage: int, memory_working_set: int,
                 memory_rss: int, pids: int) -> None:
        self.cpu_usage_ns = cpu_usage_ns
        self.memory_usage = memory_usage
        self.memory_working_set = memory_working_set
        self.memory_rss = memory_rss
        self.pids = pids


def usage(directory: str) -> Usage:
    cpu = parse_flat_keyed(read_or_empty(os.path.join(directory, "cpu.stat")))
    mem = parse_flat_keyed(read_or_empty(os.path.join(directory, "memory.stat")))
    current = _single(os.path.join(directory, "memory.current"))
    # The kubelet's working set: usage minus the page cache the kernel can drop at once.
    working_set = max(current - mem.get("inactive_file", 0), 0)
    return Usage(cpu_usage_ns=cpu.get("usage_usec", 0) * 1000, memory_usage=current,
                 memory_working_set=working_set, memory_rss=mem.get("anon", 0),
                 pids=_single(os.path.join(directory, "pids.current")))


def exit_reason(code: int, oom_killed: bool) -> str:
    """The CRI reason for a finished container."""
    if oom_killed:
        return "OOMKilled"
    return "Completed" if code == 0 else "Error"
