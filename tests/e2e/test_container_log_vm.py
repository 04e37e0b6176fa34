"""The CRI log file of containers in a real micro-VM, as kubelet and critest read it: there
from StartContainer on, and holding every byte the container wrote once its status says
EXITED (critest reads it right then)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.e2e.test_containers_vm import Pod, running_pod

pytestmark = pytest.mark.vm

LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")
LINES = 3000  # more than one chunk of output from the agent


@pytest.fixture(scope="module")
async def log_pod(vm_daemon: Daemon, busybox_ref: str,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    async with running_pod(vm_daemon, busybox_ref, "log-pod",
                           tmp_path_factory.mktemp("logs")) as pod:
        yield pod


def _records(path: Path) -> list[tuple[str, str, bytes]]:
    records = []
    for line in path.read_bytes().splitlines():
        match = LOG_LINE.match(line)
        assert match, line
        records.append((match[2].decode(), match[3].decode(), match[4]))
    return records


async def test_log_file_exists_once_started(log_pod: Pod) -> None:
    # Silent and long-lived: nothing would make the file but StartContainer itself.
    cid = await log_pod.container("silent", "sleep", "3600")
    log = log_pod.logs / "silent.log"
    try:
        assert log.exists() and log.read_bytes() == b""
    finally:
        await log_pod.remove(cid)
    quiet = await log_pod.container("quiet", "true")
    assert (log_pod.logs / "quiet.log").exists()
    await log_pod.wait_exit(quiet, poll=0.05)
    assert (log_pod.logs / "quiet.log").read_bytes() == b""
    await log_pod.remove(quiet)


async def test_all_output_is_in_the_log_when_exited(log_pod: Pod) -> None:
    for attempt in range(5):
        name = f"burst{attempt}"
        cid = await log_pod.container(
            name, "sh", "-c", f"seq 1 {LINES}; echo last-out; echo last-err >&2")
        await log_pod.wait_exit(cid, poll=0.05)
        records = _records(log_pod.logs / f"{name}.log")
        stdout = [content for stream, tag, content in records if stream == "stdout"]
        assert stdout == [str(i).encode() for i in range(1, LINES + 1)] + [b"last-out"], attempt
        assert ("stderr", "F", b"last-err") in records, attempt
        await log_pod.remove(cid)
