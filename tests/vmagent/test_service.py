"""The agent's services, served by the real agent process over a Unix socket (and, for
SetupSandbox, inside fresh UTS + network namespaces so the host is not touched)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.vmagent.agentproc import RunningAgent, start_agent
from vmagent.api import agent_pb2 as pb
from vmagent.api.agent_grpc import AgentStub, HealthStub


@pytest.fixture
async def agent(tmp_path: Path) -> RunningAgent:
    running = await start_agent(tmp_path, transport="unix", namespaces=True)
    yield running
    await running.stop()


@pytest.fixture
async def stub(agent: RunningAgent) -> AgentStub:
    channel = Channel(path=agent.sock_path)
    yield AgentStub(channel)
    channel.close()


def nsenter(pid: int, *cmd: str) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-u", "-n", *cmd], check=True,
                          capture_output=True, text=True).stdout.strip()


def exec_req(*argv: str, **kw: object) -> pb.ExecSyncRequest:
    return pb.ExecSyncRequest(process=pb.Process(argv=list(argv)), **kw)  # type: ignore[arg-type]


async def test_health_reports_guest_info(agent: RunningAgent) -> None:
    channel = Channel(path=agent.sock_path)
    try:
        reply = await HealthStub(channel).Check(pb.CheckRequest(), timeout=10)
    finally:
        channel.close()
    assert reply.agent_version
    assert reply.kernel_release == Path("/proc/sys/kernel/osrelease").read_text().strip()
    assert reply.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert 0 < reply.agent_started_uptime_seconds <= reply.agent_serving_uptime_seconds
    assert reply.agent_serving_uptime_seconds <= reply.uptime_seconds
    assert reply.transport == "unix" and not reply.sandbox_ready


async def test_setup_sandbox(agent: RunningAgent, stub: AgentStub, tmp_path: Path) -> None:
    reply = await stub.SetupSandbox(pb.SetupSandboxRequest(
        request_id="r1", sandbox_id="pod1", hostname="pod-one",
        resolv_conf="nameserver 10.0.0.10\nsearch default.svc\n", hosts="127.0.0.1 localhost\n",
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0",
                 "net/ipv4/ping_group_range": "0 2147483647"}), timeout=10)
    assert reply.hostname == "pod-one"
    assert nsenter(agent.pid, "hostname") == "pod-one"
    assert Path(reply.resolv_conf_path).read_text() == "nameserver 10.0.0.10\nsearch default.svc\n"
    assert Path(reply.hosts_path).read_text() == "127.0.0.1 localhost\n"
    assert list(reply.applied_sysctls) == ["net.ipv4.ip_unprivileged_port_start",
                                           "net/ipv4/ping_group_range"]
    assert nsenter(agent.pid, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start") == "0"
    assert nsenter(agent.pid, "cat", "/proc/sys/net/ipv4/ping_group_range").split() == [
        "0", "2147483647"]


@pytest.mark.parametrize("key", ["../../etc/passwd", "net.ipv4.no_such_thing", "a b", ""])
async def test_setup_sandbox_rejects_bad_sysctls(stub: AgentStub, key: str) -> None:
    with pytest.raises(GRPCError) as err:
        await stub.SetupSandbox(pb.SetupSandboxRequest(sysctls={key: "1"}), timeout=10)
    assert err.value.status is Status.INVALID_ARGUMENT


async def test_exec_sync_output_and_exit(stub: AgentStub) -> None:
    reply = await stub.ExecSync(exec_req("sh", "-c", "echo out; echo err >&2; exit 3"),
                                timeout=10)
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"out\n", b"err\n", 3)
    assert not reply.timed_out


async def test_exec_sync_env_cwd(stub: AgentStub, tmp_path: Path) -> None:
    req = pb.ExecSyncRequest(process=pb.Process(
        argv=["sh", "-c", 'echo "$FOO"; pwd'], env=["FOO=bar", "PATH=/usr/bin:/bin"],
        cwd=str(tmp_path)))
    reply = await stub.ExecSync(req, timeout=10)
    assert reply.stdout.decode().split() == ["bar", str(tmp_path)]


async def test_exec_sync_timeout_kills(stub: AgentStub) -> None:
    reply = await stub.ExecSync(exec_req("sleep", "30", timeout_seconds=0.3), timeout=10)
    assert reply.timed_out and reply.signal == 9 and reply.exit_code == 137


async def test_exec_sync_caps_output(stub: AgentStub) -> None:
    reply = await stub.ExecSync(exec_req("head", "-c", "100000", "/dev/zero",
                                         output_limit_bytes=1000), timeout=10)
    assert len(reply.stdout) == 1000 and reply.stdout_truncated and reply.exit_code == 0


async def test_exec_sync_missing_binary(stub: AgentStub) -> None:
    with pytest.raises(GRPCError) as err:
        await stub.ExecSync(exec_req("/no/such/binary"), timeout=10)
    assert err.value.status is Status.NOT_FOUND


async def test_exec_sync_retry_runs_once(stub: AgentStub, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    req = exec_req("sh", "-c", f"echo x >> {marker}; cat {marker} | wc -l", request_id="e1")
    first = await stub.ExecSync(req, timeout=10)
    again = await stub.ExecSync(req, timeout=10)
    assert first.stdout == again.stdout == b"1\n"
    assert marker.read_text() == "x\n"
    other = await stub.ExecSync(exec_req("cat", str(marker), request_id="e2"), timeout=10)
    assert other.stdout == b"x\n"


async def test_orphans_are_reaped(agent: RunningAgent, stub: AgentStub) -> None:
    # The shell exits at once; its background child is orphaned, re-parented to the agent
    # (a subreaper here, PID 1 in the VM), and must not stay a zombie after it exits.
    await stub.ExecSync(exec_req("sh", "-c", "(sleep 0.2; true) >/dev/null 2>&1 &"), timeout=10)
    for _ in range(100):
        await asyncio.sleep(0.05)
        children = zombies = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == agent.pid:
                children += 1
                zombies += fields[0] == "Z"
        if children == 0:
            break
    assert children == 0 and zombies == 0


UNKNOWN_CONTAINER = [
    ("StartContainer", pb.StartContainerRequest(container_id="nope")),
    ("SignalContainer", pb.SignalContainerRequest(container_id="nope", signal=15)),
    ("WaitContainer", pb.WaitContainerRequest(container_id="nope")),
    ("GetContainerState", pb.ContainerRequest(container_id="nope")),
    ("UpdateResources", pb.UpdateResourcesRequest(container_id="nope")),
    ("Stats", pb.StatsRequest(container_ids=["nope"])),
    ("ExecSync", exec_req("true", container_id="nope")),
]


@pytest.mark.parametrize(("name", "request_"), UNKNOWN_CONTAINER)
async def test_unknown_container(stub: AgentStub, name: str, request_: object) -> None:
    with pytest.raises(GRPCError) as err:
        await getattr(stub, name)(request_, timeout=10)
    assert err.value.status is Status.NOT_FOUND, err.value
    assert "nope" in str(err.value.message)


async def test_container_calls_without_containers(stub: AgentStub) -> None:
    await stub.DeleteContainer(pb.DeleteContainerRequest(container_id="nope"), timeout=10)
    assert not (await stub.Stats(pb.StatsRequest(), timeout=10)).containers  # none known
    with pytest.raises(GRPCError) as err:
        await stub.CreateContainer(pb.CreateContainerRequest(container_id="../x"), timeout=10)
    assert err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(GRPCError) as err:
        await stub.ReadStdio(pb.ReadStdioRequest(container_id="nope"), timeout=10)
    assert err.value.status is Status.NOT_FOUND


@pytest.mark.parametrize("name", ["Exec", "Attach", "PortForward"])
async def test_streams_need_a_start_message(stub: AgentStub, name: str) -> None:
    method = getattr(stub, name)
    with pytest.raises(GRPCError) as err:
        async with method.open(timeout=10) as stream:
            await stream.send_message(method.request_type(), end=True)
            await stream.recv_message()
    assert err.value.status is Status.INVALID_ARGUMENT
    assert "first message" in str(err.value.message)


async def test_shutdown_ends_the_agent(agent: RunningAgent, stub: AgentStub) -> None:
    await stub.Shutdown(pb.ShutdownRequest(), timeout=10)
    assert await asyncio.wait_for(agent.proc.wait(), 20) == 0


async def test_stats_has_the_interfaces_without_details(agent: RunningAgent,
                                                        stub: AgentStub) -> None:
    # PodSandboxStats carries the pod's network usage: a plain Stats call must have it.
    nsenter(agent.pid, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    reply = await stub.Stats(pb.StatsRequest(), timeout=10)
    assert sorted(i.name for i in reply.interfaces) == ["eth0", "peer0"]  # loopback aside


async def test_traced_calls_return_the_agents_step_timings(agent: RunningAgent) -> None:
    from criserver.backends.microvm.channel import AgentAddress, AgentClient
    from vmagent.steps import Steps, recording

    client = AgentClient("test-pod", AgentAddress(unix_path=agent.sock_path))
    try:
        untraced = await client.call("SetupSandbox", pb.SetupSandboxRequest(
            request_id="r0", sandbox_id="pod1", hostname="pod-zero"))
        with recording(Steps()) as steps:
            await client.check()  # a call without steps of its own
            traced = await client.call("SetupSandbox", pb.SetupSandboxRequest(
                request_id="r1", sandbox_id="pod1", hostname="pod-one"))
            await client.call("Shutdown", pb.ShutdownRequest(action=pb.ShutdownRequest.REBOOT))
    finally:
        client.close()
    assert untraced.hostname == "pod-zero" and traced.hostname == "pod-one"
    assert list(steps.ms) == ["agent.Check", "agent.SetupSandbox", "guest.SetupSandbox.files",
                              "agent.Shutdown"]  # Shutdown sends its own trailers: no steps
    assert steps.ms["guest.SetupSandbox.files"] <= steps.ms["agent.SetupSandbox"]
