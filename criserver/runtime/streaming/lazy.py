"""The streaming server, started on the first Exec, Attach or PortForward: its web stack
(aiohttp) costs an idle daemon ~14 MiB, and most nodes stream rarely."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from criserver.config import StreamingConfig

if TYPE_CHECKING:
    from criserver.runtime.streaming.server import StreamingServer


class LazyStreaming:
    def __init__(self, config: StreamingConfig) -> None:
        self._config = config
        self._server: StreamingServer | None = None
        self._stack = AsyncExitStack()
        self._starting = asyncio.Lock()

    async def server(self) -> StreamingServer:
        async with self._starting:
            if self._server is None:
                from criserver.runtime.streaming.server import serving

                self._server = await self._stack.enter_async_context(serving(self._config))
            return self._server

    async def close(self) -> None:
        """Stop the server if it ever started: ends the sessions (and their processes)."""
        await self._stack.aclose()
        self._server = None
