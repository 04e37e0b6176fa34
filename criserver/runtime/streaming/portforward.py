"""Port forwarding into a pod, as kubelet serves it.

Over SPDY (`portforward.k8s.io`) one connection carries many forwarded connections: each is a
pair of client-opened streams, `data` and `error`, tied by their `requestID` header and naming
the pod port in a `port` header. Newer clients send the same SPDY session tunnelled in a
WebSocket (subprotocol `SPDY/3.1+portforward.k8s.io`, see tunnel.py). Otherwise, over
WebSocket the ports are fixed by the URL (`?port=`, else the CRI request): channel 2i carries
port i's data and 2i+1 its errors, and the first message on each starts with the port as two
little-endian bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from criserver.runtime.backend import SandboxBackend
from criserver.runtime.streaming import tunnel, upgrade
from criserver.runtime.streaming.idle import watch_idle
from criserver.runtime.streaming.interface import ByteSink, ByteSource
from criserver.runtime.streaming.spdy import SpdyStream
from criserver.runtime.streaming.websocket import PORT_FORWARD_PROTOCOLS, ChannelConnection
from criserver.store.records import PodRecord

log = logging.getLogger(__name__)

SPDY_PROTOCOLS = ["portforward.k8s.io"]


@dataclass(frozen=True)
class PortForwardRequest:
    """A PortForward request, as its token names it."""

    backend: SandboxBackend
    pod: PodRecord
    ports: tuple[int, ...] = ()

    @property
    def subject(self) -> str:
        return f"portforward pod={self.pod.id}"


async def forward(
    request: PortForwardRequest, port: int, inbound: ByteSource, outbound: ByteSink,
    errors: ByteSink,
) -> None:
    """One forwarded connection; a failure is reported on `errors` as kubelet words it."""
    try:
        await request.backend.port_forward(request.pod, port, inbound=inbound,
                                           outbound=outbound)
    except Exception as exc:
        message = f"error forwarding port {port} to pod {request.pod.id}, uid : {exc}"
        log.info("%s port=%d error=%s", request.subject, port, exc)
        await errors.write(message.encode())


# -- over SPDY -------------------------------------------------------------------------------


@dataclass
class _Pair:
    request_id: str
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    started: bool = False
    expiry: asyncio.Task[None] | None = None


def _parse_port(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


async def spdy_session(
    http: web.Request, request: PortForwardRequest, idle_timeout: float,
    creation_timeout: float, *, tunnelled: str | None = None,
) -> web.StreamResponse:
    """Serve port-forward over SPDY until the client closes the connection (or idles): over
    the HTTP connection, or tunnelled in a WebSocket when `tunnelled` names its subprotocol."""
    if tunnelled is None:
        upgrade.negotiate(http, SPDY_PROTOCOLS)
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def on_stream(stream: SpdyStream) -> bool:
        kind = stream.header("streamType")
        if _parse_port(stream.header("port")) is None or kind not in ("data", "error"):
            log.info("refusing stream port=%r type=%r %s", stream.header("port"), kind,
                     request.subject)
            return False
        request_id = stream.header("requestID")
        if not request_id:
            # Old clients send no requestID: kubelet pairs error stream N with data stream N+2.
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        pair = pairs.get(request_id)
        if pair is None:
            pair = pairs[request_id] = _Pair(request_id)
            pair.expiry = spawn(_expire(pair))
        if getattr(pair, kind) is not None:
            return False
        setattr(pair, kind, stream)
        if pair.data is not None and pair.error is not None:
            pair.started = True
            pairs.pop(request_id, None)
            if pair.expiry is not None:
                pair.expiry.cancel()
            spawn(_run_pair(pair))
        return True

    async def _expire(pair: _Pair) -> None:
        await asyncio.sleep(creation_timeout)
        if not pair.started and pairs.get(pair.request_id) is pair:
            del pairs[pair.request_id]
            log.info("timed out waiting for streams request=%s %s", pair.request_id,
                     request.subject)
            if pair.error is not None:
                await pair.error.write(
                    f"timed out waiting for streams of request {pair.request_id}".encode())
                await pair.error.close()
            if pair.data is not None:
                pair.data.reset()

    async def _run_pair(pair: _Pair) -> None:
        assert pair.data is not None and pair.error is not None
        port = _parse_port(pair.data.header("port")) or 0
        try:
            await forward(request, port, pair.data.chunks(), pair.data, pair.error)
        finally:
            await pair.data.close()
            await pair.error.close()

    response: web.StreamResponse
    wire: tunnel.WebSocketWire | None = None
    if tunnelled is None:
        response, session = await upgrade.upgrade(http, SPDY_PROTOCOLS[0], on_stream,
                                                  request.subject)
    else:
        response, session, wire = await tunnel.upgrade(http, tunnelled, on_stream,
                                                       request.subject)
    log.info("streaming session started transport=%s %s",
             "spdy" if wire is None else "spdy-over-websocket", request.subject)
    idle = asyncio.ensure_future(watch_idle(lambda: session.last_activity, idle_timeout,
                                            session.close))
    try:
        await session.done.wait()
    except asyncio.CancelledError:
        session.abort()  # the daemon stops: no lingering
        raise
    finally:
        idle.cancel()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        if wire is not None:
            await wire.wait_closed()
        log.info("streaming session ended %s", request.subject)
    return response


# -- over WebSocket --------------------------------------------------------------------------


def websocket_ports(http: web.Request, request: PortForwardRequest) -> list[int]:
    """The ports of a WebSocket port-forward: `?port=` values (repeated or comma-separated),
    else those of the CRI request.

    :raises web.HTTPBadRequest: a bad port, or none at all.
    """
    values = [p for value in http.query.getall("port", []) for p in value.split(",")]
    if not values:
        if not request.ports:
            raise web.HTTPBadRequest(text='query parameter "port" is required')
        return list(request.ports)
    ports = [_parse_port(p.strip()) for p in values]
    if None in ports:
        raise web.HTTPBadRequest(text=f"invalid port in {values}")
    return [p for p in ports if p is not None]


async def websocket_session(
    http: web.Request, request: PortForwardRequest, idle_timeout: float
) -> web.WebSocketResponse:
    """Serve port-forward over WebSocket: one connection per port, for the socket's lifetime."""
    ports = websocket_ports(http, request)
    conn = await ChannelConnection.accept(http, PORT_FORWARD_PROTOCOLS,
                                          {2 * i for i in range(len(ports))})
    log.info("streaming session started transport=websocket ports=%s %s", ports,
             request.subject)
    for i, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        await conn.send(2 * i, prefix)
        await conn.send(2 * i + 1, prefix)
    reader = asyncio.ensure_future(conn.read_loop())
    idle = asyncio.ensure_future(watch_idle(lambda: conn.last_activity, idle_timeout, conn.close))
    forwards: asyncio.Future[Any] = asyncio.gather(*(
        forward(request, port, conn.source(2 * i), conn.sink(2 * i), conn.sink(2 * i + 1))
        for i, port in enumerate(ports)))
    gone: asyncio.Future[Any] = asyncio.ensure_future(conn.gone.wait())
    try:
        await asyncio.wait([forwards, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        forwards.cancel()
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(forwards, return_exceptions=True)
        idle.cancel()
        await conn.close()
        reader.cancel()
        log.info("streaming session ended %s", request.subject)
    return conn.ws
