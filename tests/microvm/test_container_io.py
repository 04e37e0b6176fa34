"""ContainerIO against a stand-in agent: the exit is reported only once the output is in the
CRI log file, however long the output takes to arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from criserver.backends.microvm import container_io
from criserver.backends.microvm.channel import ConnState
from criserver.backends.microvm.container_io import ContainerIO
from vmagent.api import agent_pb2 as pb


class SlowAgent:
    """The container has exited (WaitContainer answers at once); its output still streams,
    one chunk every `gap` seconds, then stops (`stall`) or ends (eof)."""

    pod_id = "pod"
    state = ConnState.READY

    def __init__(self, chunks: list[bytes], gap: float, stall: bool = False) -> None:
        self.chunks = chunks
        self.gap = gap
        self.stall = stall

    async def call(self, name: str, request: Any, *, timeout: float | None = None) -> Any:
        assert name == "WaitContainer"
        return pb.ExitStatus(exit_code=0, reason="Completed", finished_at_unix_nanos=1)

    async def stream(self, name: str, request: Any) -> AsyncIterator[pb.StdioChunk]:
        assert name == "ReadStdio"
        offset = request.offset
        for data in self.chunks:
            await asyncio.sleep(self.gap)
            yield pb.StdioChunk(offset=offset, stream=pb.StdioChunk.STDOUT, data=data)
            offset += len(data)
        if self.stall:
            await asyncio.Event().wait()
        yield pb.StdioChunk(offset=offset, eof=True)


async def _run(tmp_path: Path, agent: SlowAgent) -> tuple[bytes, float]:
    """Follow the container; returns the log file's content when the exit was reported."""
    log_path = tmp_path / "c.log"
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_exit(cid: str, code: int, reason: str, message: str, finished: int) -> None:
        seen.set_result(log_path.read_bytes() if log_path.exists() else b"")

    io = ContainerIO(agent, "c" * 64, str(log_path), tmp_path / "offset",  # type: ignore[arg-type]
                     on_exit)
    loop = asyncio.get_running_loop()
    started = loop.time()
    io.start()
    try:
        content = await asyncio.wait_for(seen, 30)
        return content, loop.time() - started
    finally:
        await io.close()


async def test_exit_waits_for_output_that_keeps_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The output takes several times the stall limit to arrive, but never stalls that long.
    monkeypatch.setattr(container_io, "DRAIN_STALL", 0.3, raising=False)
    monkeypatch.setattr(container_io, "DRAIN_TIMEOUT", 0.3, raising=False)  # an older name
    lines = [f"line {i}\n".encode() for i in range(15)]
    content, _ = await _run(tmp_path, SlowAgent(lines, gap=0.1))
    assert [line.split(b" ", 3)[3] for line in content.splitlines()] == [
        line.rstrip(b"\n") for line in lines]


async def test_exit_is_reported_when_the_output_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(container_io, "DRAIN_STALL", 0.3)
    content, elapsed = await _run(tmp_path, SlowAgent([b"first\n", b"partial"], gap=0.05,
                                                      stall=True))
    first, last = content.splitlines()
    assert first.endswith(b" stdout F first")
    assert last.endswith(b" stdout P partial")  # a line cut short by the exit
    assert elapsed < 5
