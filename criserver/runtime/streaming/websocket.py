"""Kubernetes' channel protocol over WebSocket (aiohttp): every message starts with its channel
number (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; port-forward uses 2 per port).

Subprotocols: `channel.k8s.io` (binary frames), `base64.channel.k8s.io` (text frames: the channel
as an ASCII digit, then base64), their `v4.` variants (JSON status on the error channel) and
`v5.channel.k8s.io` (v4 plus a CLOSE message, [255, channel], by which a client half-closes
stdin). A request naming no subprotocol is served as `channel.k8s.io`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web

from criserver.runtime.streaming import remotecommand
from criserver.runtime.streaming.idle import watch_idle
from criserver.runtime.streaming.remotecommand import Status, StdioTarget

log = logging.getLogger(__name__)

V5 = "v5.channel.k8s.io"
V4_BINARY, V4_BASE64 = "v4.channel.k8s.io", "v4.base64.channel.k8s.io"
BINARY, BASE64 = "channel.k8s.io", "base64.channel.k8s.io"
EXEC_PROTOCOLS = [V5, V4_BINARY, V4_BASE64, BINARY, BASE64]
PORT_FORWARD_PROTOCOLS = [V4_BINARY, V4_BASE64]
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
CLOSE_SIGNAL = 255
CLOSE_TIMEOUT = 2.0  # seconds to wait for the client's close frame
INPUT_QUEUE = 16  # messages buffered per input channel before the reader stops reading


class _Gone:
    """Queued on every input channel when the connection ends."""


_GONE = _Gone()


class ChannelConnection:
    """One upgraded WebSocket, multiplexed into numbered channels."""

    def __init__(self, ws: web.WebSocketResponse, protocol: str, readable: set[int]) -> None:
        self.ws = ws
        self.protocol = protocol
        self.base64 = "base64" in protocol
        self.gone = asyncio.Event()  # the client closed or the connection broke
        self.last_activity = asyncio.get_running_loop().time()
        self._inputs: dict[int, asyncio.Queue[bytes | _Gone | None]] = {
            channel: asyncio.Queue(INPUT_QUEUE) for channel in readable}

    @classmethod
    async def accept(
        cls, request: web.Request, protocols: list[str], readable: set[int]
    ) -> ChannelConnection:
        """Upgrade `request`; a client offering only subprotocols we lack gets 400, as in
        kubelet (aiohttp would otherwise accept it with none)."""
        offered = [p.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", [])
                   for p in value.split(",") if p.strip()]
        if offered and not set(offered) & set(protocols):
            raise web.HTTPBadRequest(
                text=f"requested protocol(s) are not supported: {offered}; supports {protocols}")
        ws = web.WebSocketResponse(protocols=protocols, autoping=True, timeout=CLOSE_TIMEOUT)
        await ws.prepare(request)
        return cls(ws, ws.ws_protocol or BINARY, readable)

    async def send(self, channel: int, data: bytes) -> None:
        """One message on `channel`; waits while the client reads slowly, dropped once gone."""
        if self.gone.is_set() or self.ws.closed:
            return
        self.last_activity = asyncio.get_running_loop().time()
        try:
            if self.base64:
                await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
            else:
                await self.ws.send_bytes(bytes([channel]) + data)
        except ConnectionError:
            self.gone.set()

    def sink(self, channel: int) -> ChannelSink:
        return ChannelSink(self, channel)

    async def source(self, channel: int) -> AsyncIterator[bytes]:
        """Messages the client sends on `channel` until it closes the channel (v5).

        :raises ConnectionResetError: the connection ended first.
        """
        queue = self._inputs[channel]
        while (data := await queue.get()) is not None:
            if isinstance(data, _Gone):
                queue.put_nowait(_GONE)
                raise ConnectionResetError("the WebSocket client went away")
            yield data

    async def read_loop(self) -> None:
        """Route incoming messages to their channels until the client closes."""
        try:
            async for message in self.ws:
                self.last_activity = asyncio.get_running_loop().time()
                if message.type == WSMsgType.BINARY:
                    raw: bytes = message.data
                elif message.type == WSMsgType.TEXT:
                    raw = message.data.encode()
                else:
                    break
                await self._route(raw)
        finally:
            self.gone.set()
            for queue in self._inputs.values():
                while queue.full():  # nobody will read what is left: make room for the news
                    queue.get_nowait()
                queue.put_nowait(_GONE)

    async def _route(self, raw: bytes) -> None:
        if not raw:
            return
        channel, payload = raw[0], raw[1:]
        if self.protocol == V5 and channel == CLOSE_SIGNAL:
            if payload and payload[0] in self._inputs:
                await self._inputs[payload[0]].put(None)
            return
        if self.base64:
            channel -= ord("0")
            try:
                payload = base64.b64decode(payload, validate=True)
            except binascii.Error:
                log.info("dropping a message that is not base64 channel=%d", channel)
                return
        queue = self._inputs.get(channel)
        if queue is not None and payload:
            await queue.put(payload)

    async def close(self) -> None:
        self.gone.set()
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await self.ws.close()


class ChannelSink:
    """A writable channel as a `ByteSink`. The protocol has no server-side half-close: close()
    only stops further writes."""

    def __init__(self, conn: ChannelConnection, channel: int) -> None:
        self._conn = conn
        self._channel = channel
        self._closed = False

    async def write(self, data: bytes) -> None:
        if data and not self._closed:
            await self._conn.send(self._channel, data)

    async def close(self) -> None:
        self._closed = True


async def stdio_session(
    request: web.Request, stdio_request: StdioTarget, idle_timeout: float
) -> web.WebSocketResponse:
    """Serve one exec/attach over WebSocket."""
    readable = ({RESIZE} if stdio_request.tty else set()) | (
        {STDIN} if stdio_request.stdin else set())
    conn = await ChannelConnection.accept(request, EXEC_PROTOCOLS, readable)
    log.info("streaming session started protocol=%s transport=websocket %s", conn.protocol,
             stdio_request.subject)
    # As kubelet does: an empty message on the lowest writable channel says "connected".
    first = STDOUT if stdio_request.stdout else STDERR if stdio_request.stderr else ERROR
    await conn.send(first, b"")
    reader = asyncio.ensure_future(conn.read_loop())
    idle = asyncio.ensure_future(watch_idle(lambda: conn.last_activity, idle_timeout, conn.close))

    async def write_status(status: Status) -> None:
        data = remotecommand.encode_status(status, conn.protocol)
        if data:
            await conn.send(ERROR, data)

    stdio = remotecommand.Stdio(
        stdin=conn.source(STDIN) if stdio_request.stdin else None,
        stdout=conn.sink(STDOUT) if stdio_request.stdout else None,
        stderr=conn.sink(STDERR) if stdio_request.stderr else None,
        resize=(remotecommand.decode_resizes(conn.source(RESIZE)) if stdio_request.tty
                else None),
        write_status=write_status,
    )
    try:
        await remotecommand.run(stdio_request, stdio, conn.gone)
    finally:
        idle.cancel()
        await conn.close()
        reader.cancel()
    return conn.ws
