"""Request-id de-duplication: a call retried after a reconnect (same request_id) gets the first
call's result, or joins it while it still runs, instead of doing its work twice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

_KEEP = 512


class RecentRequests:
    """Remembers the outcome of the last few hundred requests by (method, request_id)."""

    def __init__(self, keep: int = _KEEP) -> None:
        self._keep = keep
        self._entries: OrderedDict[tuple[str, str], asyncio.Future[Any]] = OrderedDict()

    async def run(self, method: str, request_id: str, work: Callable[[], Awaitable[T]]) -> T:
        if not request_id:
            return await work()
        key = (method, request_id)
        fut = self._entries.get(key)
        if fut is None:
            # The work runs in its own task so a caller that disconnects (its handler is
            # cancelled) does not cancel the work a retry is about to join.
            fut = asyncio.ensure_future(work())
            self._entries[key] = fut
            self._evict()
            fut.add_done_callback(self._forget_failure(key))
        else:
            self._entries.move_to_end(key)
        result: T = await asyncio.shield(fut)
        return result

    def _evict(self) -> None:
        # Oldest first, and never work still running (a retry must be able to join it).
        for key in list(self._entries):
            if len(self._entries) <= self._keep:
                return
            if self._entries[key].done():
                del self._entries[key]

    def _forget_failure(self, key: tuple[str, str]) -> Callable[[asyncio.Future[Any]], None]:
        # A failed attempt must be retryable, so only successes are remembered.
        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                if self._entries.get(key) is fut:
                    del self._entries[key]

        return done
