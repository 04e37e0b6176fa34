"""Unit tests of the agent's pure parts: settings parsing, sysctl names, the method tables,
request-id de-duplication, finding the port by name."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from grpclib.exceptions import GRPCError

from vmagent.api import agent_grpc
from vmagent.idempotency import RecentRequests
from vmagent.mapping import mapping_for
from vmagent.port import find_port
from vmagent.sandbox import apply_node_tunables, reseed_rng, sysctl_path
from vmagent.service import AgentService, HealthService
from vmagent.settings import load


def test_settings_from_cmdline_then_argv(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=hvc0 criserver.transport=serial criserver.vsock-port=2000 "
                       "criserver.poll_interval=0.5 criserver.unknown=1 quiet\n")
    s = load(["--transport=unix:/x", "--power_off=false"], str(cmdline))
    assert (s.transport, s.vsock_port, s.poll_interval, s.power_off) == (
        "unix:/x", 2000, 0.5, False)


def test_templates_keep_their_boot_cache(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("criserver.template=1\n")
    assert load([], str(cmdline)).template
    cmdline.write_text("quiet\n")
    assert not load([], str(cmdline)).template


def test_reseed_rng_checks_its_input_and_reports_errors(tmp_path: Path) -> None:
    with pytest.raises(GRPCError, match="multiple of 4"):
        reseed_rng(b"abc")
    not_a_device = tmp_path / "urandom"
    not_a_device.write_bytes(b"")
    with pytest.raises(GRPCError, match="reseed the RNG"):
        reseed_rng(b"\0" * 32, device=str(not_a_device))  # ENOTTY: the ioctl reached the file


def test_settings_power_off_defaults_on_in_a_vm(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("criserver.log_level=debug\n")
    assert load([], str(cmdline)).power_off
    cmdline.write_text("quiet\n")
    assert not load([], str(cmdline)).power_off  # not PID 1 and no criserver words


@pytest.mark.parametrize(("key", "path"), [
    ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
    ("net/ipv4/conf/eth0.100/forwarding", "/proc/sys/net/ipv4/conf/eth0.100/forwarding"),
])
def test_sysctl_path(key: str, path: str) -> None:
    assert sysctl_path(key) == path


def test_node_tunables_let_a_container_over_its_limit_be_oom_killed(tmp_path: Path) -> None:
    """The guest overcommits as kubelet's nodes do (vm.overcommit_memory=1): under the
    kernel's default heuristic a small guest refused a container's large allocation (ENOMEM,
    reason Error) before its cgroup could OOM-kill it (reason OOMKilled)."""
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "overcommit_memory").write_text("0\n")  # the kernel's default
    (vm / "panic_on_oom").write_text("0\n")
    assert apply_node_tunables(str(tmp_path)) == ["vm.overcommit_memory"]
    assert (vm / "overcommit_memory").read_text() == "1"
    assert (vm / "panic_on_oom").read_text() == "0\n"  # already right: not rewritten
    assert apply_node_tunables(str(tmp_path)) == []
    (vm / "panic_on_oom").unlink()  # unwritable or absent: the agent serves on regardless
    (vm / "overcommit_memory").write_text("2\n")
    assert apply_node_tunables(str(tmp_path)) == ["vm.overcommit_memory"]


@pytest.mark.parametrize("key", ["", "net..x", "../etc", "net/../../etc", "a b", "k;rm"])
def test_sysctl_path_rejects(key: str) -> None:
    with pytest.raises(GRPCError):
        sysctl_path(key)


def test_method_tables_cover_the_generated_services() -> None:
    # The agent builds its tables from the descriptor; they must match what protoc generated.
    for service, base in (("Health", agent_grpc.HealthBase), ("Agent", agent_grpc.AgentBase)):
        impl = {"Health": HealthService, "Agent": AgentService}[service](None)  # type: ignore[arg-type]
        generated = base.__mapping__(impl)  # type: ignore[arg-type]
        ours = mapping_for(service, impl)
        assert ours.keys() == generated.keys()
        for name, handler in ours.items():
            assert handler[1:] == generated[name][1:]
            assert inspect.iscoroutinefunction(handler.func)


def test_mapping_for_names_missing_handler() -> None:
    with pytest.raises(TypeError, match=r"Agent\.SetupSandbox"):
        mapping_for("Agent", object())


async def test_recent_requests_runs_once_and_joins() -> None:
    recent = RecentRequests(keep=2)
    runs = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return runs

    first = asyncio.ensure_future(recent.run("M", "a", work))
    second = asyncio.ensure_future(recent.run("M", "a", work))  # joins the running one
    await asyncio.sleep(0)
    gate.set()
    assert await first == await second == 1
    assert await recent.run("M", "a", work) == 1  # remembered
    assert await recent.run("M", "", work) == 2  # no id: no de-duplication
    await recent.run("M", "b", work)
    await recent.run("M", "c", work)
    assert await recent.run("M", "a", work) == 5  # evicted (keep=2)


async def test_recent_requests_forget_failures() -> None:
    recent = RecentRequests()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first try fails")
        return "ok"

    with pytest.raises(RuntimeError):
        await recent.run("M", "x", flaky)
    assert await recent.run("M", "x", flaky) == "ok"


def test_find_port(tmp_path: Path) -> None:
    for entry, name in (("vport0p0", ""), ("vport1p1", "org.qemu.guest_agent.0"),
                        ("vport2p1", "criserver.agent")):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name + "\n")
    assert find_port("criserver.agent", str(tmp_path)) == "/dev/vport2p1"
    with pytest.raises(FileNotFoundError):
        find_port("nope", str(tmp_path))
