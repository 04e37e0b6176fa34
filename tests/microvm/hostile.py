"""A hostile guest agent for the host's channel tests: a raw HTTP/2 server (the h2 library, no
gRPC framework) on the Unix socket an AgentClient dials, so each test decides every byte the
host reads: well-formed lies, malformed gRPC messages, broken HTTP/2, floods and stalls.

A behaviour is an async function called for each request with the request's stream; it answers
through `Request`'s helpers (which keep the client's flow-control windows) or writes raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def grpc_message(payload: bytes, *, length: int | None = None, compressed: bool = False) -> bytes:
    """The gRPC length-prefixed form of `payload` (the prefix may lie: `length`)."""
    return struct.pack(">?I", compressed, len(payload) if length is None else length) + payload


class Request:
    """One request the host made: its method path, and how to answer it."""

    def __init__(self, agent: HostileConnection, stream_id: int, path: str) -> None:
        self.agent = agent
        self.stream_id = stream_id
        self.path = path
        self.data = bytearray()  # what the host sent on the stream

    @property
    def method(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    async def headers(self) -> None:
        self.agent.conn.send_headers(self.stream_id, GRPC_HEADERS)
        await self.agent.flush()

    async def repeat(self, data: bytes, times: int) -> int:
        """Send `data` `times` times (a flood that is not built in memory first)."""
        return sum([await self.data_frames(data) for _ in range(times)])

    async def data_frames(self, data: bytes, *, end: bool = False) -> int:
        """Send `data` within the client's windows (waiting for them); the bytes sent."""
        conn, sent = self.agent.conn, 0
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(self.stream_id),
                         conn.max_outbound_frame_size)
            if window <= 0:
                await self.agent.window_opened()
                continue
            conn.send_data(self.stream_id, bytes(view[:window]))
            view, sent = view[window:], sent + window
            await self.agent.flush()
        if end:
            conn.end_stream(self.stream_id)
            await self.agent.flush()
        return sent

    async def trailers(self, status: int = 0, message: str = "") -> None:
        extra = [("grpc-message", message)] if message else []
        self.agent.conn.send_headers(self.stream_id, [("grpc-status", str(status)), *extra],
                                     end_stream=True)
        await self.agent.flush()

    async def reply(self, payload: bytes) -> None:
        """A complete, well-formed unary answer."""
        await self.headers()
        await self.data_frames(grpc_message(payload))
        await self.trailers()


Behaviour = Callable[[Request], Awaitable[None]]


class HostileConnection:
    """One HTTP/2 connection from the host, served by `behaviour`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 behaviour: Behaviour) -> None:
        self.reader, self.writer = reader, writer
        self.behaviour = behaviour
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.requests: dict[int, Request] = {}
        self.closed = asyncio.Event()
        self._window = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def window_opened(self) -> None:
        if self.closed.is_set():
            raise ConnectionResetError("the host closed the connection")
        self._window.clear()
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({closed, asyncio.ensure_future(self._window.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if self.closed.is_set():
            raise ConnectionResetError("the host closed the connection")

    async def serve(self) -> None:
        self.conn.initiate_connection()
        await self.flush()
        try:
            while data := await self.reader.read(65536):
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._on_event(event)
                await self.flush()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            self._window.set()
            for task in list(self._tasks):
                task.cancel()
            self.writer.close()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            path = dict(event.headers).get(":path", "")
            request = self.requests[event.stream_id] = Request(self, event.stream_id, path)
            task = asyncio.create_task(self._run(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if (request := self.requests.get(event.stream_id)) is not None:
                request.data += event.data
        elif isinstance(event, h2.events.WindowUpdated):
            self._window.set()

    async def _run(self, request: Request) -> None:
        # The host resetting a stream or closing the connection ends a behaviour early.
        with contextlib.suppress(h2.exceptions.StreamClosedError, ConnectionError,
                                 h2.exceptions.ProtocolError):
            await self.behaviour(request)


class HostileAgent:
    """Listens where the AgentClient dials (its unix_path); one behaviour for every request,
    or `on_connect` to take over each connection's raw socket instead."""

    def __init__(self, path: str, behaviour: Behaviour | None = None,
                 on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]] | None = None) -> None:
        self.path = path
        self.behaviour = behaviour
        self.on_connect = on_connect
        self.connections: list[HostileConnection] = []
        self.accepted = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> HostileAgent:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        # Each connection's handler ends once its socket is closed.
        await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.append(handler)
        if self.on_connect is not None:
            await self.on_connect(reader, writer)
            return
        assert self.behaviour is not None
        connection = HostileConnection(reader, writer, self.behaviour)
        self.connections.append(connection)
        await connection.serve()
