"""The CRI log file of containers in a real micro-VM, as kubelet and critest read it: there
from StartContainer on, and holding every byte the container wrote once its status says
EXITED (critest reads it right then)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon

pytestmark = pytest.mark.vm

LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")
LINES = 3000  # more than one chunk of output from the agent


@dataclass
class LogPod:
    cri: CRIClient
    id: str
    logs: Path
    image: str

    async def start(self, name: str, *command: str) -> str:
        cid = await self.cri.create_container(
            self.id, name, pod_name="log-pod", image=self.image, command=list(command),
            log_path=f"{name}.log")
        await self.cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        return cid

    async def wait_exited(self, cid: str, timeout: float = 60) -> None:
        """Poll as critest does: as soon as the status says EXITED, return."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = (await self.cri.runtime.ContainerStatus(
                msg("ContainerStatusRequest", container_id=cid))).status
            if status.state == enum("CONTAINER_EXITED"):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"container {cid} did not exit")

    async def remove(self, cid: str) -> None:
        await self.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))


@pytest.fixture(scope="module")
async def log_pod(vm_daemon: Daemon, busybox_ref: str,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LogPod]:
    cri = vm_daemon.client()
    await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=busybox_ref)))
    logs = tmp_path_factory.mktemp("logs")
    pod_id = await cri.run_pod("log-pod", log_directory=str(logs))
    yield LogPod(cri, pod_id, logs, busybox_ref)
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.close()


def _records(path: Path) -> list[tuple[str, str, bytes]]:
    records = []
    for line in path.read_bytes().splitlines():
        match = LOG_LINE.match(line)
        assert match, line
        records.append((match[2].decode(), match[3].decode(), match[4]))
    return records


async def test_log_file_exists_once_started(log_pod: LogPod) -> None:
    # Silent and long-lived: nothing would make the file but StartContainer itself.
    cid = await log_pod.start("silent", "sleep", "3600")
    log = log_pod.logs / "silent.log"
    try:
        assert log.exists() and log.read_bytes() == b""
    finally:
        await log_pod.remove(cid)
    quiet = await log_pod.start("quiet", "true")
    assert (log_pod.logs / "quiet.log").exists()
    await log_pod.wait_exited(quiet)
    assert (log_pod.logs / "quiet.log").read_bytes() == b""
    await log_pod.remove(quiet)


async def test_all_output_is_in_the_log_when_exited(log_pod: LogPod) -> None:
    for attempt in range(5):
        name = f"burst{attempt}"
        cid = await log_pod.start(
            name, "sh", "-c", f"seq 1 {LINES}; echo last-out; echo last-err >&2")
        await log_pod.wait_exited(cid)
        records = _records(log_pod.logs / f"{name}.log")
        stdout = [content for stream, tag, content in records if stream == "stdout"]
        assert stdout == [str(i).encode() for i in range(1, LINES + 1)] + [b"last-out"], attempt
        assert ("stderr", "F", b"last-err") in records, attempt
        await log_pod.remove(cid)
