"""Fixtures for the streaming tests: a real streaming server on loopback, the local backend
(host subprocesses), and the pod/container records a prepared request names."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime.streaming.portforward import PortForwardRequest
from criserver.runtime.streaming.remotecommand import StdioRequest
from criserver.runtime.streaming.server import StreamingServer
from criserver.store.records import ContainerRecord, ContainerState, PodRecord, PodState
from tests.runtime.streaming.local_backend import LocalBackend

POD = PodRecord(id="p" * 64, config=cri.PodSandboxConfig(), runtime_handler="local",
                created_at=1, state=PodState.READY)
CONTAINER = ContainerRecord(id="c" * 64, pod_id=POD.id, config=cri.ContainerConfig(),
                            created_at=1, state=ContainerState.RUNNING)


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    b = LocalBackend()
    yield b
    for proc in b.processes:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def server() -> AsyncIterator[StreamingServer]:
    s = StreamingServer("127.0.0.1", 0, creation_timeout=2.0)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def exec_url(server: StreamingServer, backend: LocalBackend, cmd: list[str], *,
             tty: bool = False, stdin: bool = False, stdout: bool = True,
             stderr: bool = False) -> str:
    return server.prepare(StdioRequest("exec", backend, POD, CONTAINER, tuple(cmd), tty=tty,
                                       stdin=stdin, stdout=stdout, stderr=stderr))


def attach_url(server: StreamingServer, backend: LocalBackend, *, stdin: bool = True) -> str:
    return server.prepare(StdioRequest("attach", backend, POD, CONTAINER, stdin=stdin,
                                       stdout=True))


def port_forward_url(server: StreamingServer, backend: LocalBackend,
                     ports: tuple[int, ...] = ()) -> str:
    return server.prepare(PortForwardRequest(backend, POD, ports))


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server on loopback: echoes until the client half-closes, then closes."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    """Poll `predicate()` until true (for effects with no event to await, like a killed pid)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
