"""The helper tasks of one streaming session (stdin pump, resize pump, output relays): started
as the session needs them, cancelled together when it ends, whatever ended it. Backends' relays
share it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class SessionTasks:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
