"""Process checks the tests share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def running(pid: int) -> bool:
    """Not gone, and not a zombie: daemonized QEMUs and monitors are reparented to PID 1,
    which may be slow to reap them (or, in some sandboxes, never does)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def thread_niceness(pid: int) -> dict[int, int]:
    """Each thread's niceness (field 19 of its stat): tid -> niceness."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        found[int(task.name)] = int(fields[16])
    return found


def qemu_like(pidfile: Path) -> subprocess.Popen[bytes]:
    """A sleeping process whose command line names `pidfile`, as a VM's QEMU does, and which
    has written it. Popen returns once exec has begun, but the kernel fills /proc/<pid>/cmdline
    a little later: the child's first line says it is there."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)",
                             "-pidfile", str(pidfile)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"\n"
    pidfile.write_text(str(proc.pid))
    return proc
