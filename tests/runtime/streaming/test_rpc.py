"""The Exec/Attach/PortForward CRI calls: validation, and that the URL they return works.

Runs on a real Runtime (sqlite store in a temp dir) with the local backend; the daemon wiring
(servicer table, Runtime.streaming) is tested once the daemon starts the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import Config
from criserver.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from criserver.runtime.backend import BackendContext, BaseBackend
from criserver.runtime.runtime import Runtime
from criserver.runtime.streaming import rpc
from criserver.runtime.streaming.server import StreamingServer
from criserver.store.db import Database
from criserver.store.records import ContainerState
from tests.runtime.streaming.conftest import CONTAINER, POD
from tests.runtime.streaming.local_backend import LocalBackend
from tests.runtime.streaming.spdy_client import SpdyClient


class _Started:
    """Stands in for the daemon's LazyStreaming, with the fixture's server already running."""

    def __init__(self, server: StreamingServer) -> None:
        self._server = server

    async def server(self) -> StreamingServer:
        return self._server


@pytest.fixture
async def rt(tmp_path: Path, server: StreamingServer,
             backend: LocalBackend) -> AsyncIterator[Runtime]:
    db = await Database.open(tmp_path / "criserver.db")
    runtime = Runtime(Config(), db, backends={"local": backend})
    await runtime.pods.add(POD)
    await runtime.containers.add(CONTAINER)
    runtime.streaming = _Started(server)  # type: ignore[assignment]
    try:
        yield runtime
    finally:
        await db.close()


async def test_exec_url_runs_the_command(rt: Runtime, server: StreamingServer) -> None:
    response = await rpc.exec_(rt, cri.ExecRequest(
        container_id=CONTAINER.id[:12], cmd=["echo", "hi"], stdout=True))
    assert response.url.startswith(f"{server.base_url}/exec/")
    client = await SpdyClient.connect(response.url, ["v4.channel.k8s.io"])
    error = await client.open_stream({"streamType": "error"})
    stdout = await client.open_stream({"streamType": "stdout"})
    assert await stdout.read_all() == b"hi\n"
    assert json.loads(await error.read_all())["status"] == "Success"
    await client.close()


@pytest.mark.parametrize("fields", [
    {"cmd": ["sh"]},  # no stream at all
    {"cmd": ["sh"], "tty": True, "stdout": True, "stderr": True},  # a tty has no stderr
    {"cmd": [], "stdout": True},
    {"container_id": "", "cmd": ["sh"], "stdout": True},
])
async def test_exec_rejects_bad_requests(rt: Runtime, fields: dict[str, Any]) -> None:
    request = cri.ExecRequest(**{"container_id": CONTAINER.id, **fields})
    with pytest.raises(InvalidArgument):
        await rpc.exec_(rt, request)


async def test_exec_needs_a_running_container(rt: Runtime) -> None:
    with pytest.raises(NotFound):
        await rpc.exec_(rt, cri.ExecRequest(container_id="nope", cmd=["sh"], stdout=True))
    await rt.containers.update(CONTAINER.id, lambda c: replace(c, state=ContainerState.EXITED))
    with pytest.raises(FailedPrecondition):
        await rpc.attach(rt, cri.AttachRequest(container_id=CONTAINER.id, stdout=True))


async def test_attach_and_port_forward_urls(rt: Runtime, server: StreamingServer) -> None:
    attach = await rpc.attach(rt, cri.AttachRequest(container_id=CONTAINER.id, stdin=True,
                                                    stdout=True))
    assert attach.url.startswith(f"{server.base_url}/attach/")
    forward = await rpc.port_forward(rt, cri.PortForwardRequest(pod_sandbox_id=POD.id,
                                                                port=[80]))
    assert forward.url.startswith(f"{server.base_url}/portforward/")
    with pytest.raises(InvalidArgument):
        await rpc.port_forward(rt, cri.PortForwardRequest(pod_sandbox_id=POD.id, port=[70000]))
    with pytest.raises(NotFound):
        await rpc.port_forward(rt, cri.PortForwardRequest(pod_sandbox_id="nope"))


async def test_at_most_1000_outstanding_urls(rt: Runtime) -> None:
    request = cri.ExecRequest(container_id=CONTAINER.id, cmd=["true"], stdout=True)
    urls = [(await rpc.exec_(rt, request)).url for _ in range(1000)]
    with pytest.raises(ResourceExhausted):
        await rpc.exec_(rt, request)
    client = await SpdyClient.connect(urls[0], ["v4.channel.k8s.io"])  # using one frees one
    assert client.status == 101
    await client.close()
    await rpc.exec_(rt, request)


async def test_backend_without_streaming_and_no_server(rt: Runtime, tmp_path: Path) -> None:
    context = BackendContext(handler="local", root=tmp_path, state=tmp_path, config=Config(),
                             events=None)  # type: ignore[arg-type]
    rt.backends["local"] = BaseBackend({}, context)
    request = cri.ExecRequest(container_id=CONTAINER.id, cmd=["true"], stdout=True)
    with pytest.raises(Unimplemented):
        await rpc.exec_(rt, request)
    rt.streaming = None  # type: ignore[attr-defined]
    with pytest.raises(Unavailable):
        await rpc.port_forward(rt, cri.PortForwardRequest(pod_sandbox_id=POD.id))
