"""Facts about the guest for Health.Check and Stats: kernel, boot time, uptime, memory, CPU.
All reads are of procfs, which is memory-backed, so they are done inline on the event loop.
"""

from __future__ import annotations

import os
import time


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def uptime() -> float:
    """Seconds since boot (CLOCK_BOOTTIME, which /proc/uptime also reports)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_time_ns() -> int:
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    try:
        return _read("/proc/sys/kernel/random/boot_id").strip()
    except OSError:
        return ""


def kernel_release() -> str:
    return os.uname().release


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def cpu_usage_ns() -> int:
    """Busy CPU time of the whole guest (all but idle and iowait), in nanoseconds."""
    first = _read("/proc/stat").split("\n", 1)[0].split()
    ticks = [int(v) for v in first[1:]]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def loadavg() -> tuple[float, int]:
    """1-minute load and the number of processes."""
    parts = _read("/proc/loadavg").split()
    return float(parts[0]), int(parts[3].split("/")[1])
