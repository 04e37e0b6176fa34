"""Single-flight: concurrent callers asking for the same key share one running task.

The shared task is cancelled only when every caller waiting on it has gone (cancelled or timed
out), and the last one waits for its clean-up, so nothing half-done outlives its callers.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiters = 0


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._calls: dict[str, _Call[T]] = {}

    def running(self, key: str) -> bool:
        return key in self._calls

    async def run(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        call = self._calls.get(key)
        if call is None:
            call = _Call(asyncio.ensure_future(fn()))
            self._calls[key] = call
            call.task.add_done_callback(functools.partial(self._forget, key, call))
        call.waiters += 1
        try:
            result = await asyncio.shield(call.task)
        except asyncio.CancelledError:
            call.waiters -= 1
            if call.waiters == 0 and not call.task.done():
                call.task.cancel()
                await asyncio.wait([call.task])  # let its finally blocks remove temp files
            raise
        except BaseException:
            call.waiters -= 1
            raise
        call.waiters -= 1
        return result

    def _forget(self, key: str, call: _Call[T], _task: object) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
