"""A container log on a full filesystem (issue 18), the path of the micro-VM backend: its log
pump (ContainerIO) writes through ContainerLog. On a tiny tmpfs: while it is full the records
are dropped (counted, one warning), the file never holds half a record, the pump and the
container's exit report go on, and logging resumes once there is space. No VM is booted."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from criserver.backends.microvm.channel import ConnState
from criserver.backends.microvm.container_io import ContainerIO
from criserver.runtime.container_log import ContainerLog
from tests.loopfs import fill, unfill
from tests.runtime.test_container_log import lines, parse_file
from vmagent.api import agent_pb2 as pb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "logs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_log_drops_whole_records_and_resumes(tiny_fs: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tiny_fs / "c.log"
    log = ContainerLog(str(path), container_id="c" * 64)
    await log.write("stdout", b"before\n")
    fill(tiny_fs, leave=700)  # room for a few records, not for the burst below
    burst = [f"{i:04d} ".encode() + b"x" * 90 + b"\n" for i in range(200)]
    for line in burst:  # never raises: the container must not be held up
        await log.write("stdout", line)
    assert log.lost_bytes > 0
    warnings = [r for r in caplog.records if "container log full" in r.getMessage()]
    assert len(warnings) == 1  # one per episode, not one per write
    kept = lines(parse_file(path))  # whole records only: nothing cut half-way
    assert kept[0] == ("stdout", b"before")
    assert all(content.rstrip(b"\n") + b"\n" in burst for _, content in kept[1:])
    assert len(kept) < len(burst)

    unfill(tiny_fs)
    await log.write("stderr", b"after\n")
    await log.write("stdout", b"tail without newline")
    await log.close()
    records = parse_file(path)
    assert lines(records)[-2:] == [("stderr", b"after"), ("stdout", b"tail without newline")]
    assert any("writable again" in r.getMessage() for r in caplog.records)


class QueueAgent:
    """An agent whose container output the test hands over chunk by chunk (None: the end)."""

    pod_id = "pod"
    state = ConnState.READY

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.exited = asyncio.Event()

    async def call(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        assert name == "WaitContainer"
        await self.exited.wait()
        return pb.ExitStatus(exit_code=3, reason="Error", finished_at_unix_nanos=1)

    async def stream(self, name: str, request: Any) -> AsyncIterator[pb.StdioChunk]:
        offset = request.offset
        while (data := await self.chunks.get()) is not None:
            yield pb.StdioChunk(offset=offset, stream=pb.StdioChunk.STDOUT, data=data)
            offset += len(data)
        yield pb.StdioChunk(offset=offset, eof=True)


async def test_the_micro_vm_log_pump_outlives_a_full_disk(tiny_fs: Path, tmp_path: Path) -> None:
    agent = QueueAgent()
    path = tiny_fs / "c.log"
    exits: list[tuple[int, str]] = []

    async def on_exit(cid: str, code: int, reason: str, message: str, finished: int) -> None:
        exits.append((code, reason))

    io = ContainerIO(agent, "c" * 64, str(path), tmp_path / "offset",  # type: ignore[arg-type]
                     on_exit)
    io.start()
    try:
        await agent.chunks.put(b"one\n")
        await _until(lambda: path.exists() and b"one" in path.read_bytes())
        fill(tiny_fs)
        for i in range(100):
            await agent.chunks.put(f"lost {i} ".encode() + b"y" * 200 + b"\n")
        await _until(agent.chunks.empty)
        await asyncio.sleep(0.2)
        assert io._pump is not None and not io._pump.done()  # the pump goes on
        unfill(tiny_fs)
        await agent.chunks.put(b"two\n")
        await agent.chunks.put(None)
        agent.exited.set()
        await asyncio.wait_for(io.exited.wait(), 10)
        assert exits == [(3, "Error")]
        kept = [content for _, content in lines(parse_file(path))]
        assert kept[0] == b"one" and kept[-1] == b"two"
    finally:
        await io.close()


async def _until(check: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
