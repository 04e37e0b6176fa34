"""Exec and attach over SPDY/3.1 against the real server (local subprocess backend)."""

from __future__ import annotations

import asyncio
import json
import zlib

import pytest

from criserver.runtime.streaming.server import StreamingServer
from criserver.runtime.streaming.spdy import DICTIONARY
from tests.runtime.streaming.conftest import attach_url, exec_url, wait_for
from tests.runtime.streaming.local_backend import LocalBackend
from tests.runtime.streaming.spdy_client import ClientStream, SpdyClient

V4, V3, V2, V1 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"


async def open_exec(
    url: str, kinds: tuple[str, ...], protocol: str = V4, flow_control: bool = True
) -> tuple[SpdyClient, dict[str, ClientStream]]:
    """Connect and open streams as client-go does: error first, then the stdio streams; the
    ones the client never writes are half-closed at once."""
    client = await SpdyClient.connect(url, [protocol], flow_control=flow_control)
    assert client.status == 101, client.body
    assert client.headers["x-stream-protocol-version"] == [protocol]
    streams = {}
    for kind in ("error", *kinds):
        streams[kind] = stream = await client.open_stream({"streamType": kind})
        assert stream.reset_status is None, kind
        if kind in ("error", "stdout", "stderr"):
            await stream.close()
    return client, streams


def test_dictionary_is_the_published_one() -> None:
    # SPDY/3 section 2.6.10.1: 1423 bytes; zlib puts its Adler-32 in every header stream.
    assert len(DICTIONARY) == 1423
    assert zlib.adler32(DICTIONARY) == 0xE3C6A7C2


async def test_exec_output_and_success_status(server: StreamingServer,
                                              backend: LocalBackend) -> None:
    url = exec_url(server, backend, ["sh", "-c", "echo out; echo err >&2"], stderr=True)
    client, s = await open_exec(url, ("stdout", "stderr"))
    out, err, status = await asyncio.gather(s["stdout"].read_all(), s["stderr"].read_all(),
                                            s["error"].read_all())
    assert (out, err) == (b"out\n", b"err\n")
    assert json.loads(status) == {"metadata": {}, "status": "Success"}
    # GOAWAY names the last stream the client opened; the client closes first (linger).
    assert await asyncio.wait_for(client.goaway, 5) == (s["stdout"].id + 2, 0)
    await client.close()


async def test_exec_exit_code_v4_status(server: StreamingServer, backend: LocalBackend) -> None:
    client, s = await open_exec(exec_url(server, backend, ["sh", "-c", "exit 3"]), ("stdout",))
    status = json.loads(await s["error"].read_all())
    assert status["status"] == "Failure"
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    await client.close()


@pytest.mark.parametrize("protocol", [V3, V2, V1])
async def test_exec_exit_code_before_v4_is_text(server: StreamingServer, backend: LocalBackend,
                                                protocol: str) -> None:
    url = exec_url(server, backend, ["sh", "-c", "echo hi; exit 7"])
    client, s = await open_exec(url, ("stdout",), protocol)
    assert await s["stdout"].read_all() == b"hi\n"
    message = (await s["error"].read_all()).decode()
    assert message.startswith("command terminated with non-zero exit code")
    assert "exit code 7" in message
    await client.close()


async def test_exec_stdin_to_eof(server: StreamingServer, backend: LocalBackend) -> None:
    url = exec_url(server, backend, ["sh", "-c", "cat; echo done"], stdin=True)
    client, s = await open_exec(url, ("stdin", "stdout"))
    await s["stdin"].write(b"hello ")
    await s["stdin"].write(b"world\n")
    await s["stdin"].close()
    assert await s["stdout"].read_all() == b"hello world\ndone\n"
    assert json.loads(await s["error"].read_all())["status"] == "Success"
    await client.close()


async def test_exec_large_stdin_round_trip(server: StreamingServer,
                                           backend: LocalBackend) -> None:
    # Several windows' worth each way: flow control must keep both directions moving.
    payload = bytes(range(256)) * 4096  # 1 MiB
    url = exec_url(server, backend, ["cat"], stdin=True)
    client, s = await open_exec(url, ("stdin", "stdout"))

    async def send() -> None:
        await s["stdin"].write(payload)
        await s["stdin"].close()

    _, echoed = await asyncio.gather(send(), s["stdout"].read_all())
    assert echoed == payload
    await client.close()


async def test_exec_tty_with_resize(server: StreamingServer, backend: LocalBackend) -> None:
    url = exec_url(server, backend, ["sh", "-c", "read go; stty size"], tty=True, stdin=True)
    client, s = await open_exec(url, ("stdin", "stdout", "resize"))
    await s["resize"].write(json.dumps({"Width": 123, "Height": 45}).encode())
    await wait_for(lambda: backend.resizes)
    await s["stdin"].write(b"go\n")
    output = await s["stdout"].read_all()
    assert b"45 123" in output
    assert json.loads(await s["error"].read_all())["status"] == "Success"
    await client.close()


async def test_resize_stream_is_refused_without_tty(server: StreamingServer,
                                                    backend: LocalBackend) -> None:
    client = await SpdyClient.connect(exec_url(server, backend, ["true"]), [V4])
    stream = await client.open_stream({"streamType": "resize"})
    assert stream.reset_status == 3  # REFUSED_STREAM
    await client.close()


async def test_protocol_negotiation(server: StreamingServer, backend: LocalBackend) -> None:
    missing = await SpdyClient.connect(exec_url(server, backend, ["true"]), [])
    assert missing.status == 400
    unknown = await SpdyClient.connect(exec_url(server, backend, ["true"]), ["v9.example"])
    assert unknown.status == 403
    assert V4 in unknown.headers["x-accepted-stream-protocol-versions"]
    # The client's order wins among the protocols both sides know.
    both = await SpdyClient.connect(exec_url(server, backend, ["true"]), ["v9.example", V2, V4])
    assert both.headers["x-stream-protocol-version"] == [V2]
    await both.close()


async def test_token_is_single_use(server: StreamingServer, backend: LocalBackend) -> None:
    url = exec_url(server, backend, ["true"])
    client, s = await open_exec(url, ("stdout",))
    await s["error"].read_all()
    await client.close()
    again = await SpdyClient.connect(url, [V4])
    assert again.status == 404
    wrong_route = url.replace("/exec/", "/attach/")
    assert (await SpdyClient.connect(wrong_route, [V4])).status == 404


async def test_expired_token(backend: LocalBackend) -> None:
    server = StreamingServer("127.0.0.1", 0, token_ttl=0.2)
    await server.start()
    try:
        url = exec_url(server, backend, ["true"])
        await asyncio.sleep(0.3)
        assert (await SpdyClient.connect(url, [V4])).status == 404
    finally:
        await server.stop()


async def test_stream_creation_timeout_ends_session(server: StreamingServer,
                                                    backend: LocalBackend) -> None:
    # Asked for stdout but opens only the error stream: the server gives up (2 s here).
    client = await SpdyClient.connect(exec_url(server, backend, ["true"]), [V4])
    await client.open_stream({"streamType": "error"})
    await asyncio.wait_for(client.closed.wait(), 10)
    assert not backend.processes  # nothing was run


async def test_ping(server: StreamingServer, backend: LocalBackend) -> None:
    client, _s = await open_exec(exec_url(server, backend, ["sleep", "5"]), ("stdout",))
    await client.ping(1)
    await client.ping(3)
    await client.close()


async def test_disconnect_kills_the_process(server: StreamingServer,
                                            backend: LocalBackend) -> None:
    url = exec_url(server, backend, ["sleep", "1000"], stdin=True)
    client, _s = await open_exec(url, ("stdin", "stdout"))
    await wait_for(lambda: backend.processes)
    await client.close()
    await wait_for(lambda: backend.processes[0].returncode is not None)
    await wait_for(lambda: server.active_sessions == 0)


async def test_idle_timeout_ends_session(backend: LocalBackend) -> None:
    server = StreamingServer("127.0.0.1", 0, idle_timeout=0.5)
    await server.start()
    try:
        client, _s = await open_exec(exec_url(server, backend, ["sleep", "1000"]), ("stdout",))
        await asyncio.wait_for(client.closed.wait(), 10)
        await wait_for(lambda: backend.processes and backend.processes[0].returncode is not None)
    finally:
        await server.stop()


async def test_slow_reader_with_windows_holds_the_process(server: StreamingServer,
                                                          backend: LocalBackend) -> None:
    total = 8 * 1024 * 1024
    url = exec_url(server, backend, ["head", "-c", str(total), "/dev/zero"])
    client, s = await open_exec(url, ("stdout",))
    await asyncio.sleep(1.0)  # read nothing: no WINDOW_UPDATE goes back
    assert len(s["stdout"].data) <= 64 * 1024  # one stream window, no more
    assert backend.processes[0].returncode is None  # held by back-pressure, not finished
    assert len(await s["stdout"].read_all()) == total  # reading again lets it finish
    assert json.loads(await s["error"].read_all())["status"] == "Success"
    await client.close()


async def test_slow_reader_without_windows_holds_the_process(server: StreamingServer,
                                                             backend: LocalBackend) -> None:
    # Like moby/spdystream: no WINDOW_UPDATE ever; it stops reading its socket instead.
    total = 64 * 1024 * 1024
    url = exec_url(server, backend, ["head", "-c", str(total), "/dev/zero"])
    client, s = await open_exec(url, ("stdout",), flow_control=False)
    client.auto_read = False
    await asyncio.sleep(2.0)
    assert backend.processes[0].returncode is None  # TCP back-pressure reached the process
    client.auto_read = True
    received = 0
    while chunk := await s["stdout"].read():
        received += len(chunk)
    assert received == total
    assert json.loads(await s["error"].read_all())["status"] == "Success"
    await client.close()


async def test_many_concurrent_sessions(server: StreamingServer, backend: LocalBackend) -> None:
    async def one(i: int) -> bytes:
        url = exec_url(server, backend, ["sh", "-c", f"read x; echo $x-{i}"], stdin=True)
        client, s = await open_exec(url, ("stdin", "stdout"))
        await s["stdin"].write(b"hi\n")
        out = await s["stdout"].read_all()
        assert json.loads(await s["error"].read_all())["status"] == "Success"
        await client.close()
        return out

    outputs = await asyncio.gather(*(one(i) for i in range(40)))
    assert outputs == [f"hi-{i}\n".encode() for i in range(40)]


async def test_attach_and_detach(server: StreamingServer, backend: LocalBackend) -> None:
    main = await backend.start_main("c" * 64, ["sh", "-c", "while read l; do echo got:$l; done"])
    for word in (b"one", b"two"):  # detaching leaves the process running for the next attach
        client, s = await open_exec(attach_url(server, backend), ("stdin", "stdout"))
        await s["stdin"].write(word + b"\n")
        assert await s["stdout"].read() == b"got:" + word + b"\n"
        await client.close()
        await wait_for(lambda: server.active_sessions == 0)
        assert main.proc.returncode is None
    client, s = await open_exec(attach_url(server, backend), ("stdin", "stdout"))
    await s["stdin"].close()  # the process sees EOF and exits: the attach ends with Success
    assert json.loads(await s["error"].read_all())["status"] == "Success"
    await client.close()


async def test_stop_ends_running_sessions(backend: LocalBackend) -> None:
    server = StreamingServer("127.0.0.1", 0)
    await server.start()
    client, _ = await open_exec(exec_url(server, backend, ["sleep", "1000"]), ("stdout",))
    await wait_for(lambda: backend.processes)
    await asyncio.wait_for(server.stop(), 15)
    assert backend.processes[0].returncode is not None  # the exec'd process was killed
    await asyncio.wait_for(client.closed.wait(), 5)


async def test_command_that_cannot_run_reports_internal_error(server: StreamingServer,
                                                               backend: LocalBackend) -> None:
    client, s = await open_exec(exec_url(server, backend, ["/nonexistent/cmd"]), ("stdout",))
    status = json.loads(await s["error"].read_all())
    assert (status["status"], status["reason"], status["code"]) == ("Failure", "InternalError",
                                                                    500)
    assert "error executing command in container" in status["message"]
    assert "/nonexistent/cmd" in status["message"]
    await client.close()
