"""The HTTP/1.1 upgrade to SPDY/3.1 on an aiohttp request: the X-Stream-Protocol-Version
negotiation, the 101 response, and handing the connection's bytes to a `SpdySession`.

aiohttp only switches its parser off for WebSocket upgrades, so after the 101 this module
installs itself as the request protocol's payload parser (as aiohttp's own WebSocket response
does): every byte read from then on goes to the SPDY session instead of the HTTP parser.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from criserver.runtime.streaming.spdy import SpdySession, StreamHandler

log = logging.getLogger(__name__)

HEADER_PROTOCOL = "X-Stream-Protocol-Version"
HEADER_ACCEPTED = "X-Accepted-Stream-Protocol-Versions"
SPDY_31 = "SPDY/3.1"


def is_websocket(request: web.Request) -> bool:
    connection = request.headers.get("Connection", "").lower()
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in [t.strip() for t in connection.split(",")])


def negotiate(request: web.Request, server_protocols: list[str]) -> str:
    """The first of the client's X-Stream-Protocol-Version values the server supports.

    :raises web.HTTPBadRequest: the client named none.
    :raises web.HTTPForbidden: no common protocol (the response lists ours, as kubelet does).
    """
    offered = [p.strip() for value in request.headers.getall(HEADER_PROTOCOL, [])
               for p in value.split(",") if p.strip()]
    if not offered:
        raise web.HTTPBadRequest(text=f"unable to upgrade: {HEADER_PROTOCOL} is required")
    for protocol in offered:
        if protocol in server_protocols:
            return protocol
    headers = [(HEADER_ACCEPTED, p) for p in server_protocols]
    raise web.HTTPForbidden(
        text=f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
             f"server accepts {server_protocols}",
        headers=headers,
    )


class _Wire:
    """The request's transport as the session's `Wire`."""

    def __init__(self, request: web.Request, writer: AbstractStreamWriter) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away before the upgrade")
        self._transport: asyncio.Transport = transport
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        # Frames go straight to the transport (they are written whole, so never interleave);
        # the response's writer is what waits for aiohttp's transport to drain.
        await self._writer.drain()

    def pause_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        self._transport.close()


class _Feeder:
    """What aiohttp calls a payload parser: gets every byte read after the upgrade."""

    def __init__(self, session: SpdySession) -> None:
        self._session = session

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._session.feed(data)
        return False, b""

    def feed_eof(self) -> None:
        self._session.feed_eof()


async def upgrade(
    request: web.Request, protocol: str, on_stream: StreamHandler, name: str
) -> tuple[web.StreamResponse, SpdySession]:
    """Answer 101 with the negotiated `protocol` and start a SPDY session on the connection.

    :raises web.HTTPBadRequest: the request does not ask for SPDY/3.1.
    """
    connection = request.headers.get("Connection", "").lower()
    if "upgrade" not in connection or SPDY_31.lower() not in request.headers.get(
            "Upgrade", "").lower():
        raise web.HTTPBadRequest(text="unable to upgrade: missing upgrade headers in request")
    response = web.StreamResponse(status=101, headers={
        "Connection": "Upgrade", "Upgrade": SPDY_31, HEADER_PROTOCOL: protocol})
    response.force_close()
    writer = await response.prepare(request)
    assert writer is not None
    session = SpdySession(_Wire(request, writer), on_stream, name=name)
    request.protocol.set_parser(_Feeder(session))  # type: ignore[arg-type]
    request.protocol.keep_alive(False)
    return response, session
