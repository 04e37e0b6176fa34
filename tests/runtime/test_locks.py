"""KeyedSharedLock: sharers together, one alone, a waiting exclusive goes first."""

from __future__ import annotations

import asyncio
import contextlib

from criserver.runtime.locks import KeyedSharedLock


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_sharers_overlap_and_exclusive_waits_for_them() -> None:
    lock = KeyedSharedLock()
    order: list[str] = []
    release = asyncio.Event()

    async def share(name: str) -> None:
        async with lock.shared("pod"):
            order.append(f"{name} in")
            await release.wait()
            order.append(f"{name} out")

    async def alone() -> None:
        async with lock.exclusive("pod"):
            order.append("alone")

    async def late_sharer() -> None:
        async with lock.shared("pod"):
            order.append("late in")

    tasks = [asyncio.create_task(share("a")), asyncio.create_task(share("b"))]
    await _settle()
    tasks.append(asyncio.create_task(alone()))
    await _settle()
    tasks.append(asyncio.create_task(late_sharer()))  # arrives after the exclusive: waits
    async with lock.shared("other pod"):  # another key is not held up
        pass
    await _settle()
    assert order == ["a in", "b in"]
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order[2:] == ["a out", "b out", "alone", "late in"]


async def test_a_cancelled_exclusive_lets_sharers_go() -> None:
    lock = KeyedSharedLock()
    release = asyncio.Event()

    async def hold_shared() -> None:
        async with lock.shared("pod"):
            await release.wait()

    holder = asyncio.create_task(hold_shared())
    await _settle()
    waiting = asyncio.create_task(lock.exclusive("pod").__aenter__())
    await _settle()
    late = asyncio.create_task(hold_shared())
    await _settle()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, late), 5)
    async with lock.exclusive("pod"):  # nothing left held
        pass
