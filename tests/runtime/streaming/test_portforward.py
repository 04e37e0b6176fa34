"""Port-forward over SPDY and WebSocket to a TCP echo server on loopback."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import pytest

from criserver.runtime.streaming.server import StreamingServer
from tests.runtime.streaming.conftest import port_forward_url, wait_for
from tests.runtime.streaming.local_backend import LocalBackend
from tests.runtime.streaming.spdy_client import ClientStream, SpdyClient

PROTOCOL = "portforward.k8s.io"


async def open_pair(client: SpdyClient, port: int, request_id: str
                    ) -> tuple[ClientStream, ClientStream]:
    """As client-go's port-forwarder: the error stream first (half-closed), then data."""
    headers = {"streamType": "error", "port": str(port), "requestID": request_id}
    error = await client.open_stream(headers)
    await error.close()
    data = await client.open_stream({**headers, "streamType": "data"})
    return data, error


async def test_spdy_forwards_several_connections(server: StreamingServer, backend: LocalBackend,
                                                 echo_port: int) -> None:
    client = await SpdyClient.connect(port_forward_url(server, backend), [PROTOCOL])
    assert client.status == 101
    assert client.headers["x-stream-protocol-version"] == [PROTOCOL]

    async def one(i: int) -> None:
        data, error = await open_pair(client, echo_port, str(i))
        payload = f"request {i} ".encode() * 5000  # > one window
        await data.write(payload)
        await data.close()
        assert await data.read_all() == payload
        assert await error.read_all() == b""

    await asyncio.gather(*(one(i) for i in range(8)))
    await client.ping(1)  # the connection outlives its forwarded connections
    await client.close()


async def test_spdy_unreachable_port_reports_on_error_stream(
    server: StreamingServer, backend: LocalBackend, echo_port: int
) -> None:
    client = await SpdyClient.connect(port_forward_url(server, backend), [PROTOCOL])
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    data, error = await open_pair(client, closed_port, "1")
    message = (await error.read_all()).decode()
    assert message.startswith(f"error forwarding port {closed_port} to pod ")
    assert await data.read_all() == b""
    await client.close()


async def test_spdy_refuses_bad_streams(server: StreamingServer, backend: LocalBackend) -> None:
    client = await SpdyClient.connect(port_forward_url(server, backend), [PROTOCOL])
    for headers in ({"streamType": "data"}, {"streamType": "data", "port": "0"},
                    {"streamType": "stdin", "port": "80"}):
        stream = await client.open_stream(headers)
        assert stream.reset_status == 3, headers
    await client.close()


async def test_spdy_incomplete_pair_times_out(server: StreamingServer,
                                              backend: LocalBackend) -> None:
    client = await SpdyClient.connect(port_forward_url(server, backend), [PROTOCOL])
    error = await client.open_stream({"streamType": "error", "port": "80", "requestID": "7"})
    message = await asyncio.wait_for(error.read_all(), 10)  # creation timeout is 2 s here
    assert b"timed out waiting for streams" in message
    await client.close()


async def test_websocket_forward(server: StreamingServer, backend: LocalBackend,
                                 echo_port: int) -> None:
    url = port_forward_url(server, backend) + f"?port={echo_port}"
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url, protocols=["v4.channel.k8s.io"]) as ws:
        prefix = struct.pack("<H", echo_port)
        first = [(await ws.receive()).data for _ in range(2)]
        assert sorted(first) == sorted([b"\x00" + prefix, b"\x01" + prefix])
        await ws.send_bytes(b"\x00hello")
        reply = await ws.receive()
        assert reply.data == b"\x00hello"


async def test_websocket_ports_from_cri_request(server: StreamingServer, backend: LocalBackend,
                                                echo_port: int) -> None:
    url = port_forward_url(server, backend, (echo_port,))
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url, protocols=["v4.base64.channel.k8s.io"]) as ws:
        for _ in range(2):
            message = (await ws.receive()).data
            assert message[0] in "01"
        await ws.send_str("0" + "aGk=")  # base64 of "hi"
        reply = await ws.receive()
        assert reply.data == "0aGk="


# -- SPDY tunnelled in a WebSocket (client-go's port-forward over WebSocket, crictl -r websocket)


@pytest.mark.parametrize(("flow_control", "split"), [(False, 0), (True, 0), (False, 7)])
async def test_tunnelled_spdy_forwards_several_connections(
    server: StreamingServer, backend: LocalBackend, echo_port: int, flow_control: bool,
    split: int,
) -> None:
    # No ?port=: the ports are in the SPDY streams' headers, as with a plain SPDY upgrade.
    client = await SpdyClient.connect_tunnelled(port_forward_url(server, backend), [PROTOCOL],
                                                flow_control=flow_control, split=split)
    assert client.headers["sec-websocket-protocol"] == [f"SPDY/3.1+{PROTOCOL}"]

    async def one(i: int) -> None:
        data, error = await open_pair(client, echo_port, str(i))
        payload = f"request {i} ".encode() * 5000  # > one window
        await data.write(payload)
        await data.close()
        assert await data.read_all() == payload
        assert await error.read_all() == b""

    await asyncio.gather(*(one(i) for i in range(4)))
    await client.ping(1)  # the connection outlives its forwarded connections
    assert server.active_sessions == 1
    await client.close()
    await wait_for(lambda: server.active_sessions == 0)


async def test_tunnelled_spdy_reports_errors_and_refuses_bad_streams(
    server: StreamingServer, backend: LocalBackend
) -> None:
    client = await SpdyClient.connect_tunnelled(port_forward_url(server, backend), [PROTOCOL])
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    data, error = await open_pair(client, closed_port, "1")
    message = (await error.read_all()).decode()
    assert message.startswith(f"error forwarding port {closed_port} to pod ")
    assert await data.read_all() == b""
    stream = await client.open_stream({"streamType": "data"})  # no port
    assert stream.reset_status == 3
    await client.close()


async def test_tunnelled_spdy_session_ends_when_the_server_stops(
    backend: LocalBackend, echo_port: int
) -> None:
    server = StreamingServer("127.0.0.1", 0)
    await server.start()
    client = await SpdyClient.connect_tunnelled(port_forward_url(server, backend), [PROTOCOL])
    data, _ = await open_pair(client, echo_port, "1")
    await data.write(b"hello")
    assert await data.read() == b"hello"
    await asyncio.wait_for(server.stop(), 10)
    await asyncio.wait_for(client.closed.wait(), 10)
    await client.close()


async def test_websocket_offering_an_unknown_tunnel_is_refused(
    server: StreamingServer, backend: LocalBackend
) -> None:
    url = port_forward_url(server, backend).replace("http://", "ws://", 1)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, protocols=["SPDY/3.1+nosuch.k8s.io"])
    assert refused.value.status == 400
