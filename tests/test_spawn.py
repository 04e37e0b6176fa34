import asyncio
import contextlib
import gc
import os
import signal
import subprocess
from typing import IO, Any

import pytest
import uvloop

from criserver import spawn


async def test_pipes_and_exit_status() -> None:
    child = await spawn.spawn(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=spawn.PIPE,
                              stdout=spawn.PIPE, stderr=spawn.PIPE)
    assert child.stdin is not None
    child.stdin.write(b"in and out\n")
    await child.stdin.drain()
    child.stdin.close()
    out, err = await child.communicate()
    assert (out, err, child.returncode) == (b"in and out\n", b"err\n", 3)


async def test_kill_and_concurrent_waits() -> None:
    child = await spawn.spawn(["sleep", "60"])
    waits = [asyncio.ensure_future(child.wait()) for _ in range(2)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waits[0]), 0.1)  # a timed-out wait stops nobody
    child.kill()
    assert await asyncio.gather(*waits) == [-signal.SIGKILL, -signal.SIGKILL]
    assert await child.wait() == -signal.SIGKILL


async def test_a_missing_program_raises() -> None:
    with pytest.raises(OSError):
        await spawn.spawn(["/nonexistent/program"])



class _RacingPipe:
    """A child's pipe whose close() first lets "another thread" open a file: what a pool thread
    does if it runs between two close(2) calls of the same number."""

    def __init__(self, pipe: IO[bytes], opened: list[int]) -> None:
        self._pipe, self._opened = pipe, opened

    def fileno(self) -> int:
        return self._pipe.fileno()

    def writable(self) -> bool:
        return self._pipe.writable()

    @property
    def closed(self) -> bool:
        return self._pipe.closed

    def close(self) -> None:
        if not self._pipe.closed:
            self._opened.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        self._pipe.close()


def test_a_file_opened_while_a_pipe_closes_stays_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's pipe transport closes its fd through libuv, then closes the file object it was
    given: a second close(2) of a number another thread may have just been given (once an EBADF
    in a CNI result write). Whatever closes a child's pipe, it closes it once."""
    opened: list[int] = []

    class Popen(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for name in ("stdin", "stdout", "stderr"):
                if getattr(self, name) is not None:
                    setattr(self, name, _RacingPipe(getattr(self, name), opened))

    monkeypatch.setattr(spawn.subprocess, "Popen", Popen)

    async def run_one() -> None:
        child = await spawn.spawn(["cat"], stdin=spawn.PIPE, stdout=spawn.PIPE,
                                  stderr=spawn.PIPE)
        assert child.stdin is not None
        child.stdin.close()
        assert await child.communicate() == (b"", b"")
        del child
        gc.collect()  # the transports close now, not whenever
        await asyncio.sleep(0.05)

    uvloop.run(run_one())
    assert len(opened) == 3
    try:
        for fd in opened:
            os.fstat(fd)  # raises EBADF if a pipe's second close took it
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)


def test_pipes_close_when_read_to_the_end_not_when_collected() -> None:
    """uvloop's pipe transports keep their fd until collected; a churning daemon grew by two
    fds per child until the cyclic collector ran. Read to the end (and the child gone, for a
    stdin nobody closed), every pipe is closed at once."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def run() -> None:
        await (await spawn.spawn(["true"], stdout=spawn.PIPE)).communicate()  # loop's own fds
        gc.disable()
        try:
            before = open_fds()
            kept = []  # referenced: only an explicit close can free their fds
            for _ in range(5):
                child = await spawn.spawn(["true"], stdin=spawn.PIPE, stdout=spawn.PIPE,
                                          stderr=spawn.PIPE)
                assert await child.communicate() == (b"", b"")  # stdin left open by us
                kept.append(child)
            await asyncio.sleep(0.05)
            assert open_fds() == before
        finally:
            gc.enable()

    uvloop.run(run())
