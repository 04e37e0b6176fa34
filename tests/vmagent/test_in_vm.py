"""The agent in a real micro-VM (QEMU under TCG, the project's guest assets): first health check
after boot, SetupSandbox and ExecSync in the guest, a second host connection after the first
closes (a daemon restart), and Shutdown powering the VM off.

Needs the guest assets (`make guest`); CRISERVER_GUEST_ASSETS points at another assets dir.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criserver.backends.microvm.channel import AgentAddress, AgentClient
from criserver.backends.microvm.guest import GuestBoot, pod_guest_spec
from criserver.vm import assets as assets_mod
from criserver.vm.accel import read_tsc_khz
from criserver.vm.qemu import SerialTransport
from criserver.vm.vm import VM
from vmagent.api import agent_pb2 as pb

pytestmark = pytest.mark.vm

ASSETS_DIR = Path(os.environ.get("CRISERVER_GUEST_ASSETS", assets_mod.DEFAULT_ASSETS_DIR))


def _assets() -> assets_mod.GuestAssets:
    try:
        return assets_mod.load(ASSETS_DIR)
    except assets_mod.AssetsError as exc:
        pytest.skip(f"no guest assets: {exc}")


@pytest.fixture
async def vm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[VM, float]]:
    assets = _assets()
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    state = Path(tmp_path_factory.mktemp("vm", numbered=True))
    spec = pod_guest_spec(f"agenttest-{os.getpid()}", state, assets,
                          SerialTransport(state / "agent.sock"),
                          GuestBoot(tsc_khz=read_tsc_khz()), pvpanic=False)
    machine = VM(spec)
    t0 = time.monotonic()
    await machine.start()
    try:
        yield machine, t0
    finally:
        if not machine.exited:
            await machine.kill()
        log = spec.log_file.read_text(errors="replace") if spec.log_file.exists() else ""
        print(f"--- guest console ---\n{log[-4000:]}")


async def test_agent_in_vm(vm: tuple[VM, float]) -> None:
    machine, t0 = vm
    spec = machine.spec
    assert isinstance(spec.transport, SerialTransport)
    address = AgentAddress(unix_path=str(spec.transport.socket_path))
    client = AgentClient(spec.vm_id, address, call_timeout=30)
    try:
        ready = await client.wait_ready(time.monotonic() + 120)
        boot_to_answer = time.monotonic() - t0
        print(f"qemu start -> first health answer: {boot_to_answer:.2f}s; agent started at "
              f"{ready.agent_started_uptime_seconds:.2f}s, serving at "
              f"{ready.agent_serving_uptime_seconds:.2f}s guest uptime")
        assert ready.transport == "virtio-serial" and ready.connection_serial == 1
        setup = await client.setup_sandbox(pb.SetupSandboxRequest(
            request_id="s1", sandbox_id=spec.vm_id, hostname="pod-in-vm",
            resolv_conf="nameserver 10.96.0.10\n",
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0"}))
        assert setup.hostname == "pod-in-vm"
        out = await client.exec_sync(pb.ExecSyncRequest(process=pb.Process(argv=[
            "sh", "-c", f"hostname; cat {setup.resolv_conf_path}; "
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start"]), timeout_seconds=30))
        assert out.stdout.decode().split("\n")[:3] == [
            "pod-in-vm", "nameserver 10.96.0.10", "0"], out
        # PID-1 duties: an orphaned background process is reaped, not left a zombie.
        await client.exec_sync(pb.ExecSyncRequest(process=pb.Process(
            argv=["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & exit 0"]), timeout_seconds=30))
        zombies = await client.exec_sync(pb.ExecSyncRequest(process=pb.Process(argv=[
            "sh", "-c", "sleep 2; grep -l '^State:.*Z' /proc/[0-9]*/status; true"]),
            timeout_seconds=30))
        assert zombies.stdout == b"", zombies
    finally:
        client.close()

    # A restarted daemon: a new client, a new HTTP/2 connection on the same port.
    second = AgentClient(spec.vm_id, address, call_timeout=30)
    try:
        again = await second.wait_ready(time.monotonic() + 60)
        assert again.connection_serial == 2
        assert again.agent_instance_id == ready.agent_instance_id
        await second.shutdown()
    finally:
        second.close()
    assert await machine.wait_exited(60)
