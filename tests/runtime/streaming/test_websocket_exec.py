"""Exec and attach over WebSocket (aiohttp's client) against the real server."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from criserver.runtime.streaming.server import StreamingServer
from tests.runtime.streaming.conftest import exec_url, wait_for
from tests.runtime.streaming.local_backend import LocalBackend


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def collect(ws: aiohttp.ClientWebSocketResponse, b64: bool = False) -> dict[int, bytes]:
    """Everything the server sends, by channel, until it closes the socket."""
    out: dict[int, bytearray] = {}
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            channel, data = message.data[0], message.data[1:]
        elif message.type == aiohttp.WSMsgType.TEXT:
            channel, data = int(message.data[0]), base64.b64decode(message.data[1:])
        else:
            break
        out.setdefault(channel, bytearray()).extend(data)
    return {channel: bytes(data) for channel, data in out.items()}


async def test_v4_output_and_exit_status(server: StreamingServer, backend: LocalBackend,
                                         http: aiohttp.ClientSession) -> None:
    url = exec_url(server, backend, ["sh", "-c", "echo out; echo err >&2; exit 4"], stderr=True)
    async with http.ws_connect(url, protocols=["v4.channel.k8s.io"]) as ws:
        assert ws.protocol == "v4.channel.k8s.io"
        out = await collect(ws)
    assert out[1] == b"out\n" and out[2] == b"err\n"
    status = json.loads(out[3])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"][0] == {"reason": "ExitCode", "message": "4"}


async def test_v4_base64(server: StreamingServer, backend: LocalBackend,
                         http: aiohttp.ClientSession) -> None:
    url = exec_url(server, backend, ["printf", "\\001\\377"])
    async with http.ws_connect(url, protocols=["v4.base64.channel.k8s.io"]) as ws:
        out = await collect(ws, b64=True)
    assert out[1] == b"\x01\xff"
    assert json.loads(out[3])["status"] == "Success"


async def test_v5_close_signal_ends_stdin(server: StreamingServer, backend: LocalBackend,
                                          http: aiohttp.ClientSession) -> None:
    url = exec_url(server, backend, ["sh", "-c", "cat; echo eof"], stdin=True)
    async with http.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws:
        await ws.send_bytes(b"\x00abc")
        await ws.send_bytes(bytes([255, 0]))  # CLOSE stdin
        out = await collect(ws)
    assert out[1] == b"abceof\n"
    assert json.loads(out[3])["status"] == "Success"


async def test_v1_channel_protocol_reports_failure_as_text(
    server: StreamingServer, backend: LocalBackend, http: aiohttp.ClientSession
) -> None:
    url = exec_url(server, backend, ["sh", "-c", "exit 2"])
    async with http.ws_connect(url, protocols=["channel.k8s.io"]) as ws:
        out = await collect(ws)
    assert out[3].decode().startswith("command terminated with non-zero exit code")
    url = exec_url(server, backend, ["true"])
    async with http.ws_connect(url, protocols=["channel.k8s.io"]) as ws:
        out = await collect(ws)
    assert out == {1: b""}  # the "connected" message only: success sends no status


async def test_tty_resize(server: StreamingServer, backend: LocalBackend,
                          http: aiohttp.ClientSession) -> None:
    url = exec_url(server, backend, ["sh", "-c", "read go; stty size"], tty=True, stdin=True)
    async with http.ws_connect(url, protocols=["v4.channel.k8s.io"]) as ws:
        await ws.send_bytes(b"\x04" + json.dumps({"Width": 90, "Height": 30}).encode())
        await wait_for(lambda: backend.resizes)
        await ws.send_bytes(b"\x00go\n")
        out = await collect(ws)
    assert b"30 90" in out[1]


async def test_unsupported_subprotocol_is_refused(server: StreamingServer,
                                                  backend: LocalBackend,
                                                  http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await http.ws_connect(exec_url(server, backend, ["true"]), protocols=["v9.example"])
    assert err.value.status == 400


async def test_disconnect_kills_the_process(server: StreamingServer, backend: LocalBackend,
                                            http: aiohttp.ClientSession) -> None:
    url = exec_url(server, backend, ["sleep", "1000"], stdin=True)
    ws = await http.ws_connect(url, protocols=["v4.channel.k8s.io"])
    await wait_for(lambda: backend.processes)
    await ws.close()
    await wait_for(lambda: backend.processes[0].returncode is not None)
    await wait_for(lambda: server.active_sessions == 0)


async def test_slow_reader_holds_the_process(server: StreamingServer, backend: LocalBackend,
                                             http: aiohttp.ClientSession) -> None:
    total = 64 * 1024 * 1024
    url = exec_url(server, backend, ["head", "-c", str(total), "/dev/zero"])
    async with http.ws_connect(url, protocols=["v4.channel.k8s.io"],
                               max_msg_size=0) as ws:
        first = await ws.receive()  # the "connected" message; then read nothing for a while
        assert first.data == b"\x01"
        await wait_for(lambda: backend.processes)
        await asyncio.sleep(2.0)
        assert backend.processes[0].returncode is None  # the WebSocket drain pushed back
        out = await collect(ws)
    assert len(out[1]) == total
