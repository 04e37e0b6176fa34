"""Stragglers: a pod whose call overran is waited for once, then asked in the background
until it answers; every other pod's answer comes back in the same list."""

from __future__ import annotations

import asyncio

from criserver.errors import DeadlineExceeded, NotFound
from criserver.runtime.stragglers import Stragglers


class Guest:
    """A pod's guest: answers at once, or (wedged) after `release` is set, or fails."""

    def __init__(self, error: Exception | None = None) -> None:
        self.wedged = False
        self.release = asyncio.Event()
        self.error = error
        self.asked = 0

    async def stats(self) -> str:
        self.asked += 1
        if self.wedged:
            await self.release.wait()
            self.release.clear()
            if self.error is not None:
                raise self.error
        return "stats"


async def test_a_wedged_pod_is_waited_for_once_then_asked_in_the_background() -> None:
    fine, wedged = Guest(), Guest(DeadlineExceeded("no answer within 10.0s"))
    wedged.wedged = True
    stragglers = Stragglers("stats")
    calls = {"fine": fine.stats, "wedged": wedged.stats}

    assert await stragglers.each(calls, timeout=0.05) == {"fine": "stats"}
    async with asyncio.timeout(0.04):  # no second wait for it, and no second call running
        for _ in range(3):
            assert await stragglers.each(calls, timeout=0.05) == {"fine": "stats"}
    assert wedged.asked == 1

    wedged.release.set()  # its late call fails: still left out, asked again in the background
    await asyncio.sleep(0.01)
    async with asyncio.timeout(0.04):
        assert await stragglers.each(calls, timeout=0.05) == {"fine": "stats"}
    assert wedged.asked == 2

    wedged.error = None
    wedged.release.set()  # that call answers: the pod is listed again, and waited for again
    await asyncio.sleep(0.01)
    wedged.wedged = False
    assert await stragglers.each(calls, timeout=0.05) == {"fine": "stats", "wedged": "stats"}


async def test_a_pod_whose_call_fails_is_left_out_of_that_list_only() -> None:
    async def gone() -> str:
        raise NotFound("pod stopped meanwhile")

    stragglers = Stragglers("stats")
    assert await stragglers.each({"gone": gone}, timeout=1) == {}
    assert await stragglers.each({"gone": Guest().stats}, timeout=1) == {"gone": "stats"}
