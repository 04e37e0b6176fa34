import asyncio
import signal

import pytest

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
