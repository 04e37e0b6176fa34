"""Finding a QEMU by its pidfile, also through a symlinked state dir (a pod given a pooled VM)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver.vm import process


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process whose command line names <tmp>/pool-1/qemu.pid, as a pooled VM's QEMU does."""
    real = tmp_path / "pool-1"
    real.mkdir()
    pidfile = real / "qemu.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-pidfile", str(pidfile)])
    pidfile.write_text(str(proc.pid))
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
