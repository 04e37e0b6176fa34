"""Per-object locks: calls on one pod or container run one at a time, others run freely.

`KeyedLock` is one lock per key (a container's lifecycle calls); `KeyedSharedLock` lets many
holders share a key or one hold it alone (a pod: its containers' lifecycle calls share it, its
own stop and remove hold it alone). What the backends are promised is in SandboxBackend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class _Shared:
    users: int = 0  # holders and waiters: the key is forgotten when none is left
    sharing: int = 0
    alone: bool = False
    waiting_alone: int = 0
    wakers: list[asyncio.Future[None]] = field(default_factory=list)

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            waker = asyncio.get_running_loop().create_future()
            self.wakers.append(waker)
            try:
                await waker
            finally:
                self.wakers.remove(waker)

    def wake(self) -> None:
        # Everyone re-checks: there are few waiters per pod.
        for waker in self.wakers:
            if not waker.done():
                waker.set_result(None)


class KeyedSharedLock:
    """A shared/exclusive lock per key. One waiting to hold a key alone goes before those
    arriving after it to share it, so a stream of container calls cannot starve a pod's stop.
    Not re-entrant: a holder must not ask for the same key again."""

    def __init__(self) -> None:
        self._keys: dict[str, _Shared] = {}

    @asynccontextmanager
    async def shared(self, key: str) -> AsyncIterator[None]:
        state = self._enter(key)
        try:
            await state.wait_until(lambda: not state.alone and not state.waiting_alone)
            state.sharing += 1
            try:
                yield
            finally:
                state.sharing -= 1
                state.wake()
        finally:
            self._leave(key, state)

    @asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        state = self._enter(key)
        try:
            state.waiting_alone += 1
            try:
                await state.wait_until(lambda: not state.alone and not state.sharing)
            finally:
                state.waiting_alone -= 1
                state.wake()  # when cancelled, those who would share may go on
            state.alone = True
            try:
                yield
            finally:
                state.alone = False
                state.wake()
        finally:
            self._leave(key, state)

    def _enter(self, key: str) -> _Shared:
        state = self._keys.setdefault(key, _Shared())
        state.users += 1
        return state

    def _leave(self, key: str, state: _Shared) -> None:
        state.users -= 1
        if not state.users:
            del self._keys[key]
