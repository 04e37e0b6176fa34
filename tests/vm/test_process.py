"""Finding a QEMU by its pidfile, also through a symlinked state dir (a pod given a pooled VM)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver.vm import process
from tests.processes import qemu_like, thread_niceness


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process whose command line names <tmp>/pool-1/qemu.pid, as a pooled VM's QEMU does."""
    real = tmp_path / "pool-1"
    real.mkdir()
    pidfile = real / "qemu.pid"
    proc = qemu_like(pidfile)
    yield proc, pidfile
    proc.kill()
    proc.wait()


def test_found_by_its_own_pidfile_and_through_a_link(
        tmp_path: Path, holder: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, pidfile = holder
    (tmp_path / "pod").symlink_to("pool-1")
    assert process.qemu_pids(pidfile) == [proc.pid]
    assert process.qemu_pids(tmp_path / "pod" / "qemu.pid") == [proc.pid]
    assert process.is_qemu_of(proc.pid, tmp_path / "pod" / "qemu.pid")
    assert not process.is_qemu_of(proc.pid, tmp_path / "other" / "qemu.pid")


def test_killed_through_a_link(tmp_path: Path,
                               holder: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, _ = holder
    (tmp_path / "pod").symlink_to("pool-1")
    assert process.kill_all(tmp_path / "pod" / "qemu.pid") == []
    assert proc.wait(timeout=5) == -9


# Threads started before the call, and one started after it by a thread that had been reniced.
THREADS = """
import threading, time, sys
def later():
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    time.sleep(60)
for _ in range(3):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
t = threading.Thread(target=lambda: (sys.stdin.readline(), later()), daemon=True)
t.start()
print("ready", flush=True)
time.sleep(60)
"""


def test_every_thread_reniced_and_back() -> None:
    proc = subprocess.Popen([sys.executable, "-c", THREADS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"ready\n"
        process.set_niceness(proc.pid, 19)
        before = thread_niceness(proc.pid)
        assert len(before) == 5 and set(before.values()) == {19}
        proc.stdin.write(b"go\n")  # the reniced thread starts another: it inherits 19
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while len(thread_niceness(proc.pid)) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(thread_niceness(proc.pid).values()) == {19}
        process.set_niceness(proc.pid, 0)
        after = thread_niceness(proc.pid)
        assert len(after) == 6 and set(after.values()) == {0}
    finally:
        proc.kill()
        proc.wait()
    process.set_niceness(proc.pid, 0)  # gone: nothing to do, no error
