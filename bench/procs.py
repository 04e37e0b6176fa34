"""What the benches read about host processes from /proc: the process table, a process tree,
memory (PSS and RSS from smaps_rollup) and CPU time (utime + stime, per process and per thread;
reaped children; the whole host).
Shared by the benches that weigh a runtime's processes against containerd's."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_table() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (parent pid, argv) of every process."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        out[int(proc.name)] = (ppid, argv)
    return out


def descendants(pid: int, table: dict[int, tuple[int, list[bytes]]] | None = None) -> set[int]:
    """`pid` and every process below it."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    pids, todo = {pid}, [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            if kid not in pids:
                pids.add(kid)
                todo.append(kid)
    return pids


def pss_rss(pid: int) -> tuple[int, int]:
    """KiB: (PSS, RSS) of one process."""
    pss = rss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
    return pss, rss


def rss_kib(pid: int) -> int:
    """The RSS of a process and its descendants (a daemon's helpers count as the daemon)."""
    total = 0
    for p in descendants(pid):
        try:
            total += pss_rss(p)[1]
        except OSError:
            pass
    return total


def _ticks(stat_path: str) -> int:
    stat = Path(stat_path).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process in clock ticks (its exited threads included), 0 if gone."""
    try:
        return _ticks(f"/proc/{pid}/stat")
    except (OSError, ValueError):
        return 0


def children_ticks(pid: int) -> int:
    """cutime + cstime: the CPU of a process's children it has waited for (a daemon's short
    helpers, such as CNI plugins), 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[13]) + int(fields[14])  # fields 16 and 17 of stat


def host_busy_ticks() -> int:
    """The host's CPU time spent on anything but idle and I/O wait, all cores, in ticks."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[1:9])
    return user + nice + system + irq + softirq + steal


def thread_stats(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (utime + stime in ticks, context switches voluntary + involuntary) of each live
    thread of a process."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            ticks = _ticks(f"{base}/stat")
            switches = sum(int(line.split()[1]) for line in Path(f"{base}/status").read_text()
                           .splitlines() if "ctxt_switches:" in line)
        except (OSError, ValueError):
            continue
        out[int(tid)] = (ticks, switches)
    return out
