"""AgentClient against the real agent process: over the simulated virtio-serial port (a pty
behind a QEMU-like Unix socket, see tests/vmagent/portsim.py) or the agent's own Unix socket;
silent servers stand in for a VM whose agent does not answer."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criserver import errors
from criserver.backends.microvm.channel import AgentAddress, AgentClient, ConnState
from tests.vmagent.agentproc import start_agent
from tests.vmagent.portsim import PortSim
from vmagent.api import agent_pb2 as pb


class SilentServer:
    """Accepts connections and reads, never answers: QEMU with no agent running."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for w in self._writers:
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        while await reader.read(65536):
            pass


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AgentClient]:
    c = AgentClient("pod-a", AgentAddress(unix_path=str(tmp_path / "agent.sock")),
                    call_timeout=10, connect_timeout=5)
    yield c
    c.close()


def test_address_needs_one_endpoint() -> None:
    with pytest.raises(ValueError):
        AgentAddress()
    with pytest.raises(ValueError):
        AgentAddress(unix_path="/x", vsock_cid=3)
    assert str(AgentAddress(vsock_cid=7)) == "vsock:7:1024"


async def test_wait_ready_while_guest_boots(tmp_path: Path, client: AgentClient) -> None:
    # QEMU's socket exists and accepts, but the agent starts only later: the client's bytes
    # wait in the port until the agent reads them.
    port = PortSim(client.address.unix_path or "")
    await port.start()
    waiter = asyncio.create_task(client.wait_ready(time.monotonic() + 60))
    await asyncio.sleep(0.5)
    assert not waiter.done()
    agent = await start_agent(tmp_path, port=port)
    try:
        reply = await waiter
        assert reply.transport == "virtio-serial"
        assert client.state is ConnState.READY
    finally:
        await agent.stop()


async def test_wait_ready_before_socket_exists(tmp_path: Path, client: AgentClient) -> None:
    waiter = asyncio.create_task(client.wait_ready(time.monotonic() + 60))
    await asyncio.sleep(0.3)  # connect attempts fail with ENOENT meanwhile
    agent = await start_agent(tmp_path)
    try:
        assert (await waiter).connection_serial >= 1
    finally:
        await agent.stop()


async def test_wait_ready_deadline(client: AgentClient) -> None:
    async with SilentServer(client.address.unix_path or ""):
        with pytest.raises(errors.DeadlineExceeded) as err:
            await client.wait_ready(time.monotonic() + 1.5)
    assert "pod pod-a" in err.value.message and "wait_ready" in err.value.message


async def test_call_timeout_names_pod_and_call(client: AgentClient) -> None:
    async with SilentServer(client.address.unix_path or ""):
        with pytest.raises(errors.DeadlineExceeded) as err:
            await client.check(timeout=0.3)
    assert "pod pod-a" in err.value.message and "Check" in err.value.message


async def test_unresponsive_connection_is_replaced(client: AgentClient) -> None:
    async with SilentServer(client.address.unix_path or "") as server:
        for _ in range(3):
            with pytest.raises(errors.DeadlineExceeded):
                await client.check(timeout=0.2)
        # Two timeouts in a row dropped the first connection; the third call opened another.
        assert server.accepted == 2


async def test_pending_call_fails_when_connection_drops(tmp_path: Path,
                                                        client: AgentClient) -> None:
    agent = await start_agent(tmp_path, transport="unix")
    try:
        await client.check()
        call = asyncio.create_task(client.exec_sync(pb.ExecSyncRequest(
            process=pb.Process(argv=["sleep", "8"])), timeout=60))
        await asyncio.sleep(0.3)
        agent.proc.kill()
        with pytest.raises(errors.Unavailable) as err:
            # The guard only keeps a broken client from hanging the suite.
            await asyncio.wait_for(call, 20)
        assert "pod pod-a" in err.value.message and "ExecSync" in err.value.message
        assert client.state is ConnState.IDLE
    finally:
        await agent.stop()


async def test_reconnects_after_agent_restart(tmp_path: Path, client: AgentClient) -> None:
    first_agent = await start_agent(tmp_path, transport="unix")
    try:
        first = await client.check()
    finally:
        await first_agent.stop()
    second_agent = await start_agent(tmp_path, transport="unix")
    try:
        for _ in range(50):  # the loss is noticed asynchronously
            if client.state is ConnState.IDLE:
                break
            await asyncio.sleep(0.02)
        second = await client.check()
        assert second.agent_instance_id != first.agent_instance_id
        assert client.connects == 2
    finally:
        await second_agent.stop()


async def test_daemon_restart_gets_fresh_connection(tmp_path: Path) -> None:
    agent = await start_agent(tmp_path)  # over the port
    address = AgentAddress(unix_path=agent.sock_path)
    try:
        serials = []
        for _ in range(3):  # each "daemon" opens its own connection, then goes away
            c = AgentClient("pod-b", address)
            serials.append((await c.wait_ready(time.monotonic() + 30)).connection_serial)
            setup = await c.setup_sandbox(pb.SetupSandboxRequest(
                request_id="same", resolv_conf="nameserver 1.1.1.1\n"))
            assert setup.resolv_conf_path
            c.close()
        assert serials == [1, 2, 3]
    finally:
        await agent.stop()


async def test_agent_errors_are_domain_errors(tmp_path: Path, client: AgentClient) -> None:
    agent = await start_agent(tmp_path, transport="unix")
    try:
        with pytest.raises(errors.InvalidArgument) as err:
            await client.call("CreateContainer", pb.CreateContainerRequest(container_id="c1"))
        assert "pod pod-a" in err.value.message and "CreateContainer" in err.value.message
        assert "OCI spec" in err.value.message
        with pytest.raises(errors.InvalidArgument):
            await client.setup_sandbox(pb.SetupSandboxRequest(sysctls={"../x": "1"}))
        reply = await client.exec_sync(pb.ExecSyncRequest(
            process=pb.Process(argv=["echo", "hi"]), timeout_seconds=5))
        assert reply.stdout == b"hi\n"
        assert (await client.stats()).guest.memory_total_bytes > 0
    finally:
        await agent.stop()


async def test_closed_client_fails_fast(client: AgentClient) -> None:
    client.close()
    with pytest.raises(errors.FailedPrecondition):
        await client.check()


async def test_lost_connection_is_closed_not_left_to_the_collector(
    tmp_path: Path, client: AgentClient
) -> None:
    """A VM that ends takes its agent's connection along; the channel that held it must be
    closed, or collecting it logs asyncio's "Unclosed connection" error."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    try:
        agent = await start_agent(tmp_path, transport="unix")
        try:
            await client.check()
            channel = weakref.ref(client._channel)  # type: ignore[arg-type]
        finally:
            await agent.stop()
        for _ in range(250):  # the loss is noticed asynchronously
            if client.state is ConnState.IDLE:
                break
            await asyncio.sleep(0.02)
        assert client.state is ConnState.IDLE
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            gc.collect()
        assert channel() is None
        assert [str(w.message) for w in seen if "Unclosed" in str(w.message)] == []
        assert [m for m in reported if "Unclosed" in m] == []
    finally:
        loop.set_exception_handler(previous)
