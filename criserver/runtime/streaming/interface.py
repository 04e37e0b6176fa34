"""The byte streams the streaming server hands a backend (`SandboxBackend.exec`, `attach`,
`port_forward` in criserver/runtime/backend.py).

The server speaks the wire protocols (SPDY/3.1, WebSocket) and hands a backend plain async byte
sources and sinks; the backend moves bytes to and from the process (or the pod's port) and never
sees a frame. One call is one session: it returns when the session is over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TerminalSize:
    width: int  # columns
    height: int  # rows


class ByteSink(Protocol):
    """Where a backend writes output: one client stream (stdout, stderr, port data)."""

    async def write(self, data: bytes) -> None:
        """Send `data`; returns once the client side took it (a slow client holds the caller
        here: that is the back-pressure). After the client has gone, data is dropped."""

    async def close(self) -> None:
        """End of output (the client sees EOF). Idempotent."""


# Client input (stdin, port-forward data): chunks until the client half-closes (iteration
# ends); iteration raises ConnectionError when the client went away instead, which is not EOF.
ByteSource = AsyncIterator[bytes]
# Terminal resizes from the client, the initial size first when the client sends one.
ResizeSource = AsyncIterator[TerminalSize]
