"""Session timeouts shared by the SPDY and WebSocket sessions: kubelet's defaults, and a
watchdog that ends a session nobody has used for the idle timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

DEFAULT_IDLE_TIMEOUT = 4 * 3600.0  # kubelet's streaming-connection-idle-timeout
DEFAULT_CREATION_TIMEOUT = 30.0  # how long a SPDY client may take to open its streams


async def watch_idle(
    last_activity: Callable[[], float], timeout: float, on_idle: Callable[[], Awaitable[None]]
) -> None:
    """Call `on_idle` once `timeout` seconds pass with no activity; run as a task and cancel it
    when the session ends first."""
    loop = asyncio.get_running_loop()
    while True:
        remaining = last_activity() + timeout - loop.time()
        if remaining <= 0:
            await on_idle()
            return
        await asyncio.sleep(remaining)
