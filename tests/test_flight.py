"""SingleFlight (criserver/flight.py): callers of one key share one task, which is cancelled
only once every caller has gone."""

from __future__ import annotations

import asyncio

import pytest

from criserver.flight import SingleFlight


async def test_concurrent_callers_share_one_call_and_later_ones_start_anew() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal started
        started += 1
        await release.wait()
        return started

    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(5)]
    other = asyncio.create_task(flight.run("other", work))
    await asyncio.sleep(0.01)
    assert flight.running("k") and started == 2
    release.set()
    assert {await c for c in callers} | {await other} <= {1, 2}
    assert not flight.running("k")
    assert await flight.run("k", work) == 3  # done calls are not cached


async def test_the_call_is_cancelled_only_when_its_last_caller_goes() -> None:
    flight: SingleFlight[None] = SingleFlight()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    first = asyncio.create_task(flight.run("k", work))
    second = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not cancelled.is_set() and flight.running("k")
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert cancelled.is_set() and not flight.running("k")


async def test_a_failure_reaches_every_caller() -> None:
    flight: SingleFlight[None] = SingleFlight()

    async def work() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("guest gone")

    results = await asyncio.gather(*(flight.run("k", work) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
