"""The agent's Exec and PortForward streams, served by the real agent process on the host
(Exec with no container runs in the "guest" itself, here the host) and driven through the
daemon's own relays (criserver.backends.microvm.streams) and AgentClient over the agent's
Unix socket.
In-memory sinks and sources stand in for the streaming server's client streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from criserver import errors
from criserver.backends.microvm.channel import AgentAddress, AgentClient
from criserver.backends.microvm.streams import exec_in_vm, port_forward_in_vm
from criserver.runtime.streaming.interface import TerminalSize
from tests.processes import running
from tests.vmagent.agentproc import RunningAgent, start_agent
from vmagent.api import agent_pb2 as pb
from vmagent.api.agent_grpc import AgentStub


class Sink:
    """A ByteSink that records; `gate` (when set) holds every write until it is set."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.data = bytearray()
        self.closed = False
        self.changed = asyncio.Event()
        self.gate = gate

    async def write(self, data: bytes) -> None:
        self.data += data
        self.changed.set()
        if self.gate is not None:
            await self.gate.wait()

    async def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def wait_for(self, needle: bytes, timeout: float = 20) -> None:
        async def wait() -> None:
            while needle not in self.data:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


class Source:
    """A ByteSource fed by the test; `end()` is the client's half-close."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> bytes:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    def put(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def end(self) -> None:
        self.queue.put_nowait(None)


async def sizes(queue: asyncio.Queue[TerminalSize]) -> AsyncIterator[TerminalSize]:
    while True:  # a client that keeps its resize stream open
        yield await queue.get()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[RunningAgent]:
    started = await start_agent(tmp_path, transport="unix")
    yield started
    await started.stop()


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    c = AgentClient("test-pod", AgentAddress(unix_path=agent.sock_path))
    yield c
    c.close()


async def wait_gone(pid: int, timeout: float = 20) -> None:
    async def wait() -> None:
        while running(pid):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), timeout)


async def test_exec_stdin_stdout_stderr_exit(client: AgentClient) -> None:
    stdin, out, err = Source(), Sink(), Sink()
    stdin.put(b"hello ")
    stdin.put(b"world")
    stdin.end()
    code = await exec_in_vm(client, "", ["sh", "-c", "cat; echo oops >&2; exit 3"], tty=False,
                            stdin=stdin, stdout=out, stderr=err, resize=None)
    assert code == 3
    assert bytes(out.data) == b"hello world" and bytes(err.data) == b"oops\n"


async def test_exec_without_stdin_sees_eof(client: AgentClient) -> None:
    out = Sink()
    code = await exec_in_vm(client, "", ["sh", "-c", "cat; echo end"], tty=False, stdin=None,
                            stdout=out, stderr=None, resize=None)
    assert code == 0 and bytes(out.data) == b"end\n"


async def test_exec_killed_by_signal(client: AgentClient) -> None:
    code = await exec_in_vm(client, "", ["sh", "-c", "kill -9 $$"], tty=False, stdin=None,
                            stdout=Sink(), stderr=None, resize=None)
    assert code == 128 + 9


async def test_exec_missing_binary_fails(client: AgentClient) -> None:
    err = Sink()
    code = await exec_in_vm(client, "", ["/no/such/binary"], tty=False, stdin=None,
                            stdout=Sink(), stderr=err, resize=None)
    assert code == 127 and b"/no/such/binary" in err.data


async def test_exec_tty_size_resize_and_stdin(client: AgentClient) -> None:
    stdin, out = Source(), Sink()
    resizes: asyncio.Queue[TerminalSize] = asyncio.Queue()
    resizes.put_nowait(TerminalSize(width=100, height=30))
    resize = sizes(resizes)
    run = asyncio.create_task(exec_in_vm(
        client, "", ["sh", "-c", "stty size; tty >/dev/null && echo is-a-tty; "
                     "while read x; do stty size; [ \"$x\" = q ] && exit 5; done"],
        tty=True, stdin=stdin, stdout=out, stderr=Sink(), resize=resize))
    await out.wait_for(b"30 100")  # the start message's size, set before the process ran
    await out.wait_for(b"is-a-tty")
    resizes.put_nowait(TerminalSize(width=120, height=40))
    # The later resize travels on its own: ask until the terminal has it.
    for _ in range(100):
        stdin.put(b"x\n")
        with contextlib.suppress(TimeoutError):
            await out.wait_for(b"40 120", timeout=0.2)
            break
    assert b"40 120" in out.data
    stdin.put(b"q\n")
    assert await asyncio.wait_for(run, 20) == 5
    assert b"x\r\n" in out.data  # the terminal echoes input and maps newlines


async def test_exec_tty_close_stdin_ends_cat(client: AgentClient) -> None:
    stdin, out = Source(), Sink()
    stdin.put(b"abc\n")
    stdin.end()
    code = await exec_in_vm(client, "", ["cat"], tty=True, stdin=stdin, stdout=out,
                            stderr=None, resize=None)
    assert code == 0 and out.data.count(b"abc") == 2  # echo + cat's output


async def test_cancel_kills_the_process(client: AgentClient) -> None:
    out = Sink()
    run = asyncio.create_task(exec_in_vm(
        client, "", ["sh", "-c", "echo $$; exec sleep 1000"], tty=False, stdin=Source(),
        stdout=out, stderr=None, resize=None))
    await out.wait_for(b"\n")
    pid = int(out.data.split()[0])
    assert running(pid)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await wait_gone(pid)
    # The connection stays usable for the next call.
    assert await exec_in_vm(client, "", ["true"], tty=False, stdin=None, stdout=None,
                            stderr=None, resize=None) == 0


async def test_slow_client_back_pressure(client: AgentClient) -> None:
    """A client that stops reading stops the process (its pipe fills) instead of the agent
    buffering its output."""
    gate = asyncio.Event()
    out = Sink(gate)
    run = asyncio.create_task(exec_in_vm(
        client, "", ["sh", "-c", "echo $$; exec cat /dev/zero"], tty=False, stdin=None,
        stdout=out, stderr=None, resize=None))
    await out.wait_for(b"\n")
    pid = int(out.data.split(b"\n")[0])
    await asyncio.sleep(1.0)
    received = len(out.data)
    # One write is held: what passed is at most one message, the rest sits in windows.
    assert received < 1024 * 1024, received
    assert running(pid)
    assert (await client.stats()).guest.memory_total_bytes > 0  # the agent still answers
    with open(f"/proc/{pid}/wchan") as f:
        assert "pipe" in f.read()  # blocked writing to its full pipe
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await wait_gone(pid)


async def test_exec_needs_start_first(agent: RunningAgent) -> None:
    channel = Channel(path=agent.sock_path)
    try:
        with pytest.raises(GRPCError) as err:
            async with AgentStub(channel).Exec.open(timeout=10) as stream:
                await stream.send_message(pb.StdioInput(stdin=b"x"), end=True)
                await stream.recv_message()
        assert err.value.status is Status.INVALID_ARGUMENT
    finally:
        channel.close()


async def test_exec_in_unknown_container(client: AgentClient) -> None:
    with pytest.raises(errors.NotFound, match="nope"):
        await exec_in_vm(client, "nope", ["true"], tty=False, stdin=None, stdout=None,
                         stderr=None, resize=None)


@pytest.fixture
async def echo_port() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Echoes until the client half-closes, then says "bye" and closes."""
    seen: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            seen.append(data)
            writer.write(data)
            await writer.drain()
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()


async def test_port_forward_both_ways_half_close(client: AgentClient,
                                                  echo_port: tuple[int, list[bytes]]) -> None:
    port, _ = echo_port
    inbound, outbound = Source(), Sink()
    run = asyncio.create_task(port_forward_in_vm(client, "pod", port, inbound=inbound,
                                                 outbound=outbound))
    inbound.put(b"ping")
    await outbound.wait_for(b"ping")
    big = os.urandom(1024 * 1024)
    inbound.put(big)
    inbound.end()  # the echo server sees EOF only now, then answers "bye" and closes
    await asyncio.wait_for(run, 30)
    assert bytes(outbound.data) == b"ping" + big + b"bye" and outbound.closed


async def test_port_forward_refused(client: AgentClient) -> None:
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(errors.Unavailable, match=f"127.0.0.1:{port}"):
            await port_forward_in_vm(client, "pod", port, inbound=Source(), outbound=Sink())


async def test_port_forward_cancel_closes_connection(client: AgentClient) -> None:
    closed = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await reader.read()  # until the agent closes its side
        closed.set()
        writer.close()

    server = await asyncio.start_server(held, "127.0.0.1", 0)
    try:
        outbound = Sink()
        run = asyncio.create_task(port_forward_in_vm(
            client, "pod", server.sockets[0].getsockname()[1], inbound=Source(),
            outbound=outbound))
        await outbound.wait_for(b"hi")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.wait_for(closed.wait(), 20)
    finally:
        server.close()
