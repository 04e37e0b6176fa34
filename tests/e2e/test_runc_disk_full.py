"""A runc container logging to a full filesystem (issue 18): the pod's log directory on a small
loop filesystem the test fills while the container writes. ctrmon drops the output meanwhile
(one line in its own log, not one per write), never cuts a record half-way, and never holds the
container up; the daemon and the container's status stay as they were; once there is space
the log resumes. No VM is booted."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from tests.cri_client import enum, msg
from tests.daemon import Daemon
from tests.e2e.test_containers_vm import running_pod
from tests.e2e.test_runc_host import (  # noqa: F401 - fixtures
    LOG_LINE,
    ctrmon,
    pod_linux,
    runc_daemon,
)
from tests.loopfs import fill, loop_fs, unfill

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root")

PAD = "x" * 100
WRITER = f"i=0; while true; do i=$((i+1)); echo \"$i {PAD}\"; usleep 2000; done"


def _numbers(path: Path) -> list[int]:
    """The counter of every record, each line checked to be one whole record."""
    out = []
    for line in path.read_bytes().splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a whole record: {line[:200]!r}"
        number, pad = match[4].split(b" ")
        assert pad == PAD.encode(), f"a record cut or merged: {line[:200]!r}"
        out.append(int(number))
    return out


async def _grows(path: Path, beyond: int, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while path.stat().st_size <= beyond:
        assert asyncio.get_running_loop().time() < deadline, "the log did not grow"
        await asyncio.sleep(0.1)


async def test_a_full_log_filesystem_drops_output_and_logging_resumes(
        runc_daemon: Daemon, busybox_ref: str, tmp_path: Path) -> None:  # noqa: F811
    with loop_fs(tmp_path / "logs", 16) as logs:
        async with running_pod(runc_daemon, busybox_ref, "full-log", logs,
                               linux=pod_linux()) as p:
            cid = await p.container("writer", "sh", "-c", WRITER)
            log_file = logs / "writer.log"
            await _grows(log_file, 10_000)
            info = (await p.cri.runtime.ContainerStatus(
                msg("ContainerStatusRequest", container_id=cid, verbose=True))).info
            diag = Path(json.loads(info["info"])["bundle"]) / "ctrmon.log"

            fill(logs)
            await asyncio.sleep(0.5)
            full_size = log_file.stat().st_size
            await asyncio.sleep(2)  # ~1,000 lines written meanwhile, none of them fit
            assert log_file.stat().st_size - full_size < 4096
            status = await p.status(cid)
            assert status.state == enum("CONTAINER_RUNNING")  # type: ignore[attr-defined]
            r = await p.exec(cid, "echo", "alive")
            assert r.stdout == b"alive\n"  # type: ignore[attr-defined]
            dropped = diag.read_text()
            assert dropped.count("output dropped until it can be written") == 1, dropped
            assert len(dropped) < 4096
            before = _numbers(log_file)

            unfill(logs)
            await _grows(log_file, full_size + 20_000)
            assert "bytes lost meanwhile" in diag.read_text()
            await p.cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid,
                                                  timeout=0))
            status = await p.wait_exit(cid, timeout=20)
            assert status.exit_code == 137  # type: ignore[attr-defined]
            after = _numbers(log_file)
            assert after[:len(before)] == before
            resumed = after[len(before):]
            assert resumed and resumed == sorted(resumed)
            assert resumed[0] > before[-1] + 500  # what came while full is gone, not late
            assert re.search(rb"\d", log_file.read_bytes()[-200:])
    assert runc_daemon.process is not None and runc_daemon.process.poll() is None
