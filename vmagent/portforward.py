"""PortForward: one TCP connection to a port in the guest (the pod's network namespace is the
guest's own) relayed both ways over the stream, half-close aware (the host's `close_write` shuts
down our sending side, the port's EOF becomes `eof`), with send credit both ways (agent.proto
WINDOW). The stream breaking closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.credit import Credit

if TYPE_CHECKING:
    from grpclib.server import Stream

log = logging.getLogger("vmagent")

_CHUNK = 65536
_CONNECT_TIMEOUT = 10.0


Send = Callable[[pb.PortForwardOutput], Awaitable[None]]


async def _receive(stream: Stream[pb.PortForwardInput, pb.PortForwardOutput],
                   queue: asyncio.Queue[bytes | None], credit: Credit) -> None:
    """Host messages, read at once (a slow port must not leave them in HTTP/2 windows): data
    waits in `queue` (None: close_write), which the host's credit bounds."""
    while (msg := await stream.recv_message()) is not None:
        kind = msg.WhichOneof("kind")
        if kind == "data":
            queue.put_nowait(msg.data)
        elif kind == "close_write":
            queue.put_nowait(None)
        elif kind == "ack":
            credit.ack(msg.ack)
    queue.put_nowait(None)  # the host ended its side: no more data either


async def _upstream(queue: asyncio.Queue[bytes | None], writer: asyncio.StreamWriter,
                    send: Send) -> None:
    """Queued data to the connection, acked once the socket took it; then shut down writing."""
    while (data := await queue.get()) is not None:
        writer.write(data)
        await writer.drain()
        await send(pb.PortForwardOutput(ack=len(data)))
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _downstream(reader: asyncio.StreamReader, credit: Credit, send: Send) -> None:
    while data := await reader.read(_CHUNK):
        await credit.take(len(data))
        await send(pb.PortForwardOutput(data=data))
    await send(pb.PortForwardOutput(eof=True))


async def serve_port_forward(stream: Stream[pb.PortForwardInput, pb.PortForwardOutput]) -> None:
    first = await stream.recv_message()
    if first is None or first.WhichOneof("kind") != "start":
        raise GRPCError(Status.INVALID_ARGUMENT, "PortForward: the first message must be `start`")
    address = first.start.address or "127.0.0.1"
    port = first.start.port
    if not 0 < port < 65536:
        raise GRPCError(Status.INVALID_ARGUMENT, f"PortForward: bad port {port}")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port),
                                                _CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        # asyncio's own strerror hides the reason ("Connect call failed"): use the errno's.
        reason = ("timed out" if isinstance(exc, TimeoutError) else
                  os.strerror(exc.errno) if exc.errno else str(exc))
        raise GRPCError(Status.UNAVAILABLE,
                        f"PortForward: cannot connect to {address}:{port}: {reason}") from exc
    log.info("port-forward connected address=%s port=%d", address, port)
    credit = Credit()
    send_lock = asyncio.Lock()

    async def send(msg: pb.PortForwardOutput) -> None:
        async with send_lock:
            await stream.send_message(msg)

    try:
        await send(pb.PortForwardOutput(connected=True))
    except BaseException:
        writer.close()
        raise
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    receiver = asyncio.ensure_future(_receive(stream, queue, credit))
    up = asyncio.ensure_future(_upstream(queue, writer, send))
    down = asyncio.ensure_future(_downstream(reader, credit, send))
    try:
        # Done when both directions are; the receiver failing means the host went away.
        pending: set[asyncio.Future[None]] = {receiver, up, down}
        while up in pending or down in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
    finally:
        for task in (receiver, up, down):
            task.cancel()
        await asyncio.gather(receiver, up, down, return_exceptions=True)
        writer.close()
        log.info("port-forward closed address=%s port=%d", address, port)
