"""The agent's virtio-serial transport, exercised with the real agent process over a pty that
stands in for the port (see portsim.py): first connection, reconnection with a fresh HTTP/2
connection on the same fd, stale bytes, no busy loop while the host is away, partial writes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from grpclib.client import Channel

from tests.vmagent.agentproc import RunningAgent, start_agent
from vmagent.api import agent_pb2 as pb
from vmagent.api.agent_grpc import AgentStub, HealthStub


async def check(sock_path: str) -> pb.CheckResponse:
    channel = Channel(path=sock_path)
    try:
        return await HealthStub(channel).Check(pb.CheckRequest(), timeout=20)
    finally:
        channel.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
async def port_agent(tmp_path: Path) -> RunningAgent:
    agent = await start_agent(tmp_path)
    yield agent
    await agent.stop()


async def test_check_over_port(port_agent: RunningAgent) -> None:
    reply = await check(port_agent.sock_path)
    assert reply.transport == "virtio-serial"
    assert reply.connection_serial == 1
    assert reply.agent_pid == port_agent.pid


async def test_reconnect_gets_fresh_connection(port_agent: RunningAgent) -> None:
    first = await check(port_agent.sock_path)
    # Between clients the agent sees EOF/HUP and must wait for SIGIO (its timer is disabled).
    second = await check(port_agent.sock_path)
    third = await check(port_agent.sock_path)
    assert [first.connection_serial, second.connection_serial, third.connection_serial] == [1, 2, 3]
    assert first.agent_instance_id == third.agent_instance_id


async def test_no_busy_loop_while_host_away(port_agent: RunningAgent) -> None:
    await check(port_agent.sock_path)  # connect and disconnect once: the port is now "HUP"
    before = cpu_seconds(port_agent.pid)
    await asyncio.sleep(1.0)
    used = cpu_seconds(port_agent.pid) - before
    # A spinning read loop would burn the whole second.
    assert used < 0.3, f"agent used {used:.2f}s CPU while idle"
    assert (await check(port_agent.sock_path)).connection_serial == 2


async def test_stale_bytes_are_discarded(port_agent: RunningAgent) -> None:
    # A client that sends garbage (as the frames of a connection the agent no longer knows).
    _, writer = await asyncio.open_unix_connection(port_agent.sock_path)
    writer.write(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"garbage" * 20)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    reply = await check(port_agent.sock_path)
    assert reply.connection_serial == 1
    assert "discarding bytes outside a connection" in port_agent.log()


async def test_new_preface_without_eof(tmp_path: Path) -> None:
    """The host reconnects before the guest read the EOF: the old connection is replaced as
    soon as the new client's preface arrives."""
    agent = await start_agent(tmp_path, keep_open=True)
    try:
        first = await check(agent.sock_path)
        second = await check(agent.sock_path)
        assert (first.connection_serial, second.connection_serial) == (1, 2)
    finally:
        await agent.stop()


async def test_large_reply_survives_partial_writes(port_agent: RunningAgent) -> None:
    # 1 MiB through a pty (4 KiB buffer) forces many partial writes and EAGAINs in the agent.
    channel = Channel(path=port_agent.sock_path)
    try:
        reply = await AgentStub(channel).ExecSync(pb.ExecSyncRequest(
            process=pb.Process(argv=["head", "-c", "1048576", "/dev/zero"]),
            timeout_seconds=30), timeout=60)
    finally:
        channel.close()
    assert reply.exit_code == 0
    assert reply.stdout == b"\0" * 1048576
