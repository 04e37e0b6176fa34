"""SPDY/3.1 tunnelled in a WebSocket, as client-go's port-forward speaks it over WebSocket
(Kubernetes >= 1.30, PortForwardWebsockets; `crictl port-forward -r websocket`): the client asks
for the subprotocol `SPDY/3.1+portforward.k8s.io`, and from then on the SPDY byte stream travels
in binary messages, split anywhere. `WebSocketWire` is the `Wire` a `SpdySession` runs on, so
the SPDY code is the same as over a plain HTTP upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from criserver.runtime.streaming.spdy import SpdySession, StreamHandler

log = logging.getLogger(__name__)

TUNNELING_PREFIX = "SPDY/3.1+"
HIGH_WATER = 256 * 1024  # bytes queued for the client before drain() waits
MAX_MESSAGE = 256 * 1024  # bytes per binary message we send
CLOSE_TIMEOUT = 2.0  # seconds to wait for the client's close frame


def tunnelled_protocol(request: web.Request, protocols: list[str]) -> str | None:
    """The first WebSocket subprotocol the client offers that tunnels one of `protocols`."""
    offered = [p.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", [])
               for p in value.split(",")]
    for protocol in offered:
        if (protocol.startswith(TUNNELING_PREFIX)
                and protocol.removeprefix(TUNNELING_PREFIX) in protocols):
            return protocol
    return None


class WebSocketWire:
    """A WebSocket as a SPDY session's byte stream. write() is synchronous (frames are written
    whole), so output is queued and one task sends it; reading stops while the session holds
    it, which leaves aiohttp's buffer to push back on the client."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._out = bytearray()
        self._pending = asyncio.Event()  # output queued, or closing
        self._below = asyncio.Event()  # output queue under HIGH_WATER
        self._below.set()
        self._readable = asyncio.Event()
        self._readable.set()
        self._closing = False
        self._broken = False
        self._writer = asyncio.ensure_future(self._write_loop())
        self._reader: asyncio.Future[None] | None = None

    def start(self, session: SpdySession) -> None:
        """Feed `session` every binary message until the client closes."""
        self._reader = asyncio.ensure_future(self._read_loop(session))

    def write(self, data: bytes) -> None:
        if self._closing or self._broken:
            return
        self._out += data
        if len(self._out) > HIGH_WATER:
            self._below.clear()
        self._pending.set()

    async def drain(self) -> None:
        """:raises ConnectionResetError: the client is gone."""
        await self._below.wait()
        if self._broken:
            raise ConnectionResetError("the WebSocket client went away")

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def close(self) -> None:
        """Send what is queued, then close the WebSocket (wait_closed() waits for it)."""
        self._closing = True
        self._pending.set()
        self._readable.set()

    async def wait_closed(self) -> None:
        self.close()
        try:
            await asyncio.shield(self._writer)
        finally:
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader

    async def _write_loop(self) -> None:
        try:
            while not self._broken:
                await self._pending.wait()
                if not self._out:
                    if self._closing:
                        break
                    self._pending.clear()
                    continue
                message = bytes(self._out[:MAX_MESSAGE])
                del self._out[:MAX_MESSAGE]
                if len(self._out) <= HIGH_WATER:
                    self._below.set()
                try:
                    await self._ws.send_bytes(message)
                except ConnectionError:
                    self._broken = True
        finally:
            self._out.clear()
            self._below.set()  # nobody waits on a queue that will not drain
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await self._ws.close()

    async def _read_loop(self, session: SpdySession) -> None:
        try:
            while not self._closing:
                await self._readable.wait()
                message = await self._ws.receive()
                if message.type == WSMsgType.BINARY:
                    session.feed(message.data)
                elif message.type == WSMsgType.TEXT:
                    # client-go fails the connection on one, too: the tunnel is binary only
                    log.info("ending a SPDY tunnel on a text message session=%s", session.name)
                    break
                else:  # CLOSE, CLOSING, CLOSED, ERROR
                    break
        finally:
            session.feed_eof()


async def upgrade(
    request: web.Request, protocol: str, on_stream: StreamHandler, name: str
) -> tuple[web.WebSocketResponse, SpdySession, WebSocketWire]:
    """Accept the WebSocket with the tunnelling `protocol` and start a SPDY session in it."""
    ws = web.WebSocketResponse(protocols=[protocol], autoping=True, timeout=CLOSE_TIMEOUT)
    await ws.prepare(request)
    wire = WebSocketWire(ws)
    session = SpdySession(wire, on_stream, name=name)
    wire.start(session)
    return ws, session, wire
