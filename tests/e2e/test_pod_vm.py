"""Pod sandboxes as real micro-VMs, through the CRI socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from criserver.backends.microvm.channel import AgentAddress, AgentClient
from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon, built_templates
from tests.e2e.conftest import (
    bridge_ports,
    iptables_rules,
    microvm_config,
    network_names,
    qemu_pids,
    require_assets,
    short_workdir,
    tear_down,
    vm_pids_of,
)
from vmagent.api import agent_pb2 as pb

pytestmark = pytest.mark.vm


async def _status(cri: CRIClient, pod_id: str) -> tuple[int, dict[str, object]]:
    r = await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id,
                                               verbose=True))
    return int(r.status.state), json.loads(r.info["info"])


async def _remove(cri: CRIClient, pod_id: str) -> None:
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))


async def test_pod_lifecycle_and_guest_config(vm_daemon: Daemon) -> None:
    cri = vm_daemon.client()
    pod_id = await cri.run_pod(
        "vm-basic", hostname="vm-basic-host",
        dns_config=msg("DNSConfig", servers=["10.96.0.10"], searches=["default.svc.local"],
                       options=["ndots:5"]),
        linux=msg("LinuxPodSandboxConfig", sysctls={"net.ipv4.ip_forward": "1"}),
    )
    state, info = await _status(cri, pod_id)
    assert state == enum("SANDBOX_READY")
    pid = info["qemuPid"]
    assert isinstance(pid, int) and vm_pids_of(pod_id) == [pid]
    assert info["accelerator"] in ("kvm", "tcg")
    assert info["guestKernel"] and info["bootTimeMs"] > 0
    assert info["vmStatus"] == "running"
    status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
    assert json.loads(status.info["runtime.microvm"])["accelerator"] == info["accelerator"]
    await cri.close()

    # Look inside the guest through the agent itself: the daemon lets go of the channel when it
    # stops (the VM keeps running), and re-adopts the VM when it starts again.
    assert vm_daemon.stop() == 0
    assert vm_pids_of(pod_id) == [pid]
    agent = AgentClient(pod_id, AgentAddress(unix_path=str(Path(info["stateDir"]) / "agent.sock")))

    async def guest(*argv: str) -> str:
        reply = await agent.exec_sync(pb.ExecSyncRequest(
            process=pb.Process(argv=list(argv)), timeout_seconds=20))
        assert reply.exit_code == 0, reply.stderr
        return reply.stdout.decode()

    assert (await guest("hostname")).strip() == "vm-basic-host"
    resolv = await guest("cat", "/run/criserver/resolv.conf")
    assert "nameserver 10.96.0.10" in resolv and "search default.svc.local" in resolv
    assert "options ndots:5" in resolv
    assert (await guest("cat", "/proc/sys/net/ipv4/ip_forward")).strip() == "1"
    agent.close()

    vm_daemon.start()
    cri = vm_daemon.client()
    state, info = await _status(cri, pod_id)
    assert state == enum("SANDBOX_READY") and info["qemuPid"] == pid
    assert info["agentConnection"] == "ready"

    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    state, _ = await _status(cri, pod_id)
    assert state == enum("SANDBOX_NOTREADY")
    assert vm_pids_of(pod_id) == []
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    assert not Path(info["stateDir"]).exists()
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.close()


async def test_killed_vm_is_noticed(vm_daemon: Daemon) -> None:
    cri = vm_daemon.client()
    pod_id = await cri.run_pod("vm-killed")
    events = cri.runtime.GetContainerEvents(msg("GetEventsRequest"))
    await asyncio.sleep(0.2)
    (pid,) = vm_pids_of(pod_id)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    async for event in events:
        if event.container_id == pod_id:
            assert event.container_event_type == enum("CONTAINER_STOPPED_EVENT")
            break
    noticed = time.monotonic() - killed_at
    events.cancel()
    state, info = await _status(cri, pod_id)
    assert state == enum("SANDBOX_NOTREADY")
    assert info["reason"] == "VMExited", info
    assert noticed < 2.0, f"noticed after {noticed:.2f}s"
    await _remove(cri, pod_id)
    await cri.close()


async def test_daemon_sigkill_readopts_running_vm(vm_daemon: Daemon) -> None:
    cri = vm_daemon.client()
    pod_id = await cri.run_pod("vm-readopt")
    _, info = await _status(cri, pod_id)
    await cri.close()
    vm_daemon.stop(signal.SIGKILL)
    assert vm_pids_of(pod_id) == [info["qemuPid"]]
    vm_daemon.start()
    cri = vm_daemon.client()
    state, after = await _status(cri, pod_id)
    assert state == enum("SANDBOX_READY")
    assert after["qemuPid"] == info["qemuPid"] and after["vmStatus"] == "running"
    await _remove(cri, pod_id)
    assert vm_pids_of(pod_id) == []
    await cri.close()


async def test_ten_pods_at_once(vm_daemon: Daemon) -> None:
    cri = vm_daemon.client()
    ids = await asyncio.gather(*(cri.run_pod(f"vm-many-{i}") for i in range(10)))
    listed = await cri.runtime.ListPodSandbox()
    ready = {p.id for p in listed.items if p.state == enum("SANDBOX_READY")}
    assert set(ids) <= ready
    assert all(len(vm_pids_of(i)) == 1 for i in ids)
    await asyncio.gather(*(_remove(cri, i) for i in ids))
    assert all(vm_pids_of(i) == [] for i in ids)
    await cri.close()


async def test_boot_timeout_undoes_everything() -> None:
    require_assets()
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, boot_timeout=0.5)).start()
    cri = daemon.client()
    try:
        before = set(qemu_pids())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cri.run_pod("vm-timeout")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "agent" in (err.value.details() or "")
        assert set(qemu_pids()) <= before
        assert not (await cri.runtime.ListPodSandbox()).items
        backend_state = daemon.state / "runtimes" / "microvm"
        # The accelerator's verdict and probe lock are the daemon's, not the pod's.
        leftovers = [p for p in backend_state.rglob("*")
                     if p.name not in ("accel.json", "accel.lock")
                     and not (p.is_dir() and p.name in ("volumes", "netns"))]
        assert leftovers == []
        assert list((daemon.state / "netns").iterdir()) == []
    finally:
        await cri.close()
        tear_down(daemon, workdir)


async def test_create_remove_cycles_leave_nothing(vm_daemon: Daemon) -> None:
    """Pods come and go: no QEMU, link, netns, IP allocation or iptables rule stays behind."""
    cri = vm_daemon.client()
    for cycle in range(2):
        ids = await asyncio.gather(*(cri.run_pod(f"vm-cycle-{cycle}-{i}") for i in range(3)))
        await asyncio.gather(*(_remove(cri, i) for i in ids))
        assert all(vm_pids_of(i) == [] for i in ids)
    assert bridge_ports(vm_daemon) == []  # every pod's veth is gone
    network = network_names(vm_daemon)[0]
    assert [rule for rule in await iptables_rules() if network in rule] == []
    state = vm_daemon.state / "runtimes" / "microvm"
    # A template build may be under way (a netns of its own, for its NIC): let it finish.
    deadline = time.monotonic() + 240
    while list((state / "templates").glob("*.tmp")) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert list((vm_daemon.state / "netns").iterdir()) == []  # the daemon's pod network
    assert list((state / "volumes").iterdir()) == []
    allocations = [p for p in (Path("/var/lib/cni/networks") / network).glob("*")
                   if p.name[0].isdigit()]
    assert allocations == []
    await cri.close()


async def test_host_network_pod_is_refused(vm_daemon: Daemon) -> None:
    cri = vm_daemon.client()
    options = msg("NamespaceOption", network=enum("NODE"))
    linux = msg("LinuxPodSandboxConfig", security_context=msg("LinuxSandboxSecurityContext",
                                                              namespace_options=options))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("vm-hostnet", linux=linux)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hostNetwork" in (err.value.details() or "")
    assert "vm-hostnet" not in {p.metadata.name for p in
                                (await cri.runtime.ListPodSandbox()).items}
    await cri.close()


def _memory_mapping(pid: int) -> dict[str, int]:
    """smaps fields (kB) of the QEMU's mapping of a template memory file."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ")[0]:
            inside = line.rstrip().endswith("/memory") and "/templates/" in line
        elif inside and line.split(":")[0] in ("Rss", "Shared_Clean", "Shared_Dirty"):
            fields[line.split(":")[0]] = fields.get(line.split(":")[0], 0) + int(line.split()[1])
    return fields


async def test_pods_start_from_a_template(vm_daemon: Daemon) -> None:
    """The first pod of a shape boots, and a template is built from its shape in the
    background; the next pods are restored from it, share its memory, and still get a clock,
    RNG state, host name and network of their own."""
    cri = vm_daemon.client()
    first = await cri.run_pod("vm-tmpl-first")
    _, info = await _status(cri, first)
    deadline = time.monotonic() + 240
    while not built_templates(vm_daemon.state):
        assert time.monotonic() < deadline, "no template built"
        await asyncio.sleep(0.5)
    (state_file,) = built_templates(vm_daemon.state)
    # A clone wakes up with the template's clock: give it something to catch up.
    await asyncio.sleep(max(0.0, state_file.stat().st_mtime + 10 - time.time()))
    clones = await asyncio.gather(*(
        cri.run_pod(f"vm-tmpl-{i}", hostname=f"clone-{i}") for i in range(2)))
    pids = []
    for pod_id in clones:
        state, info = await _status(cri, pod_id)
        assert state == enum("SANDBOX_READY")
        assert info["template"] == state_file.parent.name, info
        pids.append(info["qemuPid"])
    ips = [(await cri.runtime.PodSandboxStatus(msg(
        "PodSandboxStatusRequest", pod_sandbox_id=p))).status.network.ip for p in clones]
    await asyncio.sleep(1)
    for pid in pids:
        # The guest RAM the clones did not write is one copy in the host's page cache.
        mapping = _memory_mapping(pid)
        assert mapping["Shared_Clean"] + mapping["Shared_Dirty"] >= 16 * 1024, mapping
    state_dirs = [Path((await _status(cri, p))[1]["stateDir"]) for p in clones]
    await cri.close()

    assert vm_daemon.stop() == 0
    seen_random = set()
    for i, state_dir in enumerate(state_dirs):
        agent = AgentClient(clones[i], AgentAddress(unix_path=str(state_dir / "agent.sock")))

        async def guest(*argv: str) -> str:
            reply = await agent.exec_sync(pb.ExecSyncRequest(  # noqa: B023
                process=pb.Process(argv=list(argv)), timeout_seconds=20))
            assert reply.exit_code == 0, reply.stderr
            return reply.stdout.decode().strip()

        try:
            guest_time = int(await guest("date", "+%s"))
            assert abs(guest_time - time.time()) < 3, (guest_time, time.time())
            assert await guest("hostname") == f"clone-{i}"
            seen_random.add(await guest("sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"))
            assert f"inet {ips[i]}/" in await guest("ip", "-4", "addr", "show")
            assert await guest("cat", "/sys/class/net/eth0/address") != "02:c5:00:00:00:01"
        finally:
            agent.close()
    assert len(seen_random) == 2
    vm_daemon.start()
    cri = vm_daemon.client()
    for pod_id in (first, *clones):
        await _remove(cri, pod_id)
    await cri.close()
