"""Send credit for the interactive streams (agent.proto, WINDOW): a sender keeps at most WINDOW
bytes unacknowledged, so a slow receiver holds the sender back without ever leaving data unread
in the HTTP/2 connection that every other call of the pod shares. Used by agent and host.
"""

from __future__ import annotations

import asyncio

# Under TCG a round trip through the agent takes ~7-10 ms: 256 KiB capped port-forward at
# ~6 MiB/s, 1 MiB lets it reach the channel's ~16 MiB/s (bench/streaming_vm.py).
WINDOW = 1024 * 1024


class Credit:
    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.unacked = 0
        self._changed = asyncio.Event()

    async def take(self, size: int) -> None:
        """Wait until `size` more bytes fit (one chunk always fits when nothing is unacked)."""
        while self.unacked > 0 and self.unacked + size > self.window:
            self._changed.clear()
            await self._changed.wait()
        self.unacked += size

    def ack(self, size: int) -> None:
        self.unacked = max(0, self.unacked - size)
        self._changed.set()
