"""Finding our QEMU processes by their pidfile: the one way, for start, adoption and clean-up.

QEMU daemonizes, so it is nobody's child: a VM is found again through the pidfile in its state
dir. A pid alone may be recycled; a QEMU whose command line names that very pidfile is ours.
Blocking (/proc reads): call from a thread in async code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

KILL_TIMEOUT = 5.0  # SIGKILL to process gone


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _names(pidfile: Path) -> set[bytes]:
    """`pidfile` as a command line may name it: as given, and with symlinks resolved (a pod
    given a pooled VM reaches that VM's state dir through a link named after the pod)."""
    return {os.fsencode(str(pidfile)), os.fsencode(os.path.realpath(pidfile))}


def is_qemu_of(pid: int, pidfile: Path) -> bool:
    """Whether `pid` is a live process whose command line names `pidfile`."""
    return _names_pidfile(pid, _names(pidfile))


def _names_pidfile(pid: int, names: set[bytes]) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return not names.isdisjoint(argv)


def qemu_pids(pidfile: Path) -> list[int]:
    """Every live QEMU started with `pidfile`, whether or not it has written it yet."""
    names = _names(pidfile)
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and _names_pidfile(int(entry), names)]


def kill_all(pidfile: Path, timeout: float = KILL_TIMEOUT) -> list[int]:
    """SIGKILL every QEMU of `pidfile` and wait until they are gone. Returns the pids that
    survived (empty on success)."""
    names = _names(pidfile)
    pids = qemu_pids(pidfile)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = [pid for pid in pids if _names_pidfile(pid, names)]
    return pids


def set_niceness(pid: int, niceness: int) -> None:
    """Give every thread of `pid` this niceness. Linux keeps it per thread, and a thread
    started later takes its creator's, so this goes over the threads again until no new one
    turned up. A process gone meanwhile is left alone."""
    done: set[int] = set()
    while True:
        try:
            tids = {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
        except FileNotFoundError:
            return
        if tids <= done:
            return
        for tid in tids - done:
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        done |= tids
