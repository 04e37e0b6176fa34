"""The machine console over the real streaming server (WebSocket), with a Unix socket standing in
for QEMU's console chardev (the e2e tests use a real one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.errors import FailedPrecondition, Unavailable
from criserver.machine.console import ConsoleBroker
from criserver.runtime.streaming.server import StreamingServer

V5 = "v5.channel.k8s.io"
EXEC = iri.ExecRequest()


@pytest.fixture
async def server() -> AsyncIterator[StreamingServer]:
    server = StreamingServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Path]:
    """A console that greets, then answers each line it is sent in upper case."""
    path = tmp_path / "console.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"login: ")
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    unix = await asyncio.start_unix_server(serve, str(path))
    try:
        yield path
    finally:
        unix.close()
        await unix.wait_closed()


async def read_until(ws: aiohttp.ClientWebSocketResponse, want: bytes) -> bytes:
    seen = b""
    async with asyncio.timeout(10):
        while want not in seen:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.BINARY, message
            if message.data[0] == 1:  # stdout
                seen += message.data[1:]
    return seen


async def test_a_session_types_into_the_console_and_reads_it(
    server: StreamingServer, console: Path
) -> None:
    broker = ConsoleBroker(lambda: _ready(server), lambda machine_id: console)
    url = await broker.exec_url("m1", EXEC)
    assert url.startswith(f"{server.base_url}/exec/")
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=[V5]) as ws:
        assert await read_until(ws, b"login: ") == b"login: "
        await ws.send_bytes(b"\x00hello\n")
        assert b"HELLO" in await read_until(ws, b"HELLO")
        # One session per machine: a second URL is refused while this one lasts.
        with pytest.raises(FailedPrecondition):
            await broker.exec_url("m1", EXEC)
    await _until(lambda: not broker.busy("m1"))
    assert (await broker.exec_url("m1", EXEC)).startswith(server.base_url)


async def test_a_url_is_single_use(server: StreamingServer, console: Path) -> None:
    broker = ConsoleBroker(lambda: _ready(server), lambda machine_id: console)
    url = await broker.exec_url("m2", EXEC)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=[V5]) as ws:
            await read_until(ws, b"login: ")
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            async with http.ws_connect(url, protocols=[V5]):
                pass
        assert err.value.status == 404


async def _ready(server: StreamingServer) -> StreamingServer:
    return server


async def _until(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_a_machine_that_is_not_running_has_no_console(server: StreamingServer) -> None:
    broker = ConsoleBroker(lambda: _ready(server), lambda machine_id: None)
    with pytest.raises(Unavailable):
        await broker.exec_url("m3", EXEC)
