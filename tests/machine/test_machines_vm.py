"""The IRI MachineRuntime end to end: the real daemon over gRPC, the tests' IronCore OS image in a
real registry, real q35 VMs under TCG, host taps and bridges. What a machinepoollet does, checked
from the outside (status, events) and from inside the guest (its console, through Exec)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.machine import network
from criserver.machine.driver import VM_DIR_ID_CHARS
from tests.daemon import INERT_CONFIG, Daemon
from tests.machine import os_image
from tests.machine.client import MachineClient
from tests.machine.console import V5, Console, wait_for_log
from tests.machine.test_daemon_machines import wait_for
from tests.machine.test_os_image import files, push  # noqa: F401 - a fixture
from tests.processes import running
from tests.registry import Registry
from tests.vm.conftest import vm_dir  # noqa: F401 - a fixture: short path, no QEMU left

MiB = 1 << 20
IGNITION = b'{"ignition": {"version": "3.4.0"}, "storage": {}}'


@dataclass
class Env:
    daemon: Daemon
    client: MachineClient
    registry: Registry
    image: str  # the OS image's tag reference
    digest: str
    state: Path  # [machine] state: VM directories
    disks: Path  # where local disks live
    connections: Path  # [machine] connection_dirs


@pytest.fixture
async def env(tmp_path: Path, vm_dir: Path, registry: Registry,  # noqa: F811
              files: os_image.OsImageFiles) -> AsyncIterator[Env]:  # noqa: F811
    digest = await push(registry, files, "iri/e2e-os", as_index=True)
    connections = tmp_path / "connections"
    connections.mkdir()
    sock = tmp_path / "iri-machine.sock"
    daemon = Daemon(tmp_path, INERT_CONFIG + (
        f'[machine]\nenabled = true\nlisten = "unix://{sock}"\nstate = "{vm_dir}"\n'
        f'connection_dirs = ["{connections}"]\ndelete_grace_seconds = 30\n'
        'classes = [{name = "t1", cpu = 1, memory_bytes = 268435456}]\n')).start()
    wait_for(sock, daemon)
    client = MachineClient(sock)
    try:
        yield Env(daemon, client, registry, f"{registry.host}/iri/e2e-os:v1", digest, vm_dir,
                  tmp_path / "root" / "machines" / "disks", connections)
    finally:
        await client.close()
        daemon.kill()


def new_machine(image: str, hostname: str = "iri-e2e") -> iri.Machine:
    machine = iri.Machine()
    machine.metadata.labels["uid"] = "e2e"
    setattr(machine.spec, "class", "t1")
    machine.spec.power = iri.POWER_ON
    machine.spec.ignition_data = IGNITION
    machine.spec.guest_config.hostname = hostname
    root = machine.spec.volumes.add(name="root", device="oda")
    root.local_disk.size_bytes = 64 * MiB
    root.local_disk.image.image = image
    machine.spec.network_interfaces.add(name="eth0", network_id="net-a")
    return machine


async def open_console(env: Env, machine_id: str, http: aiohttp.ClientSession
                       ) -> aiohttp.ClientWebSocketResponse:
    response = await env.client.call("Exec", iri.ExecRequest(machine_id=machine_id))
    return await http.ws_connect(response.url, protocols=[V5])


def vm_path(env: Env, machine_id: str) -> Path:
    return env.state / machine_id[:VM_DIR_ID_CHARS]


def qemu_pid(env: Env, machine_id: str) -> int:
    return int((vm_path(env, machine_id) / "qemu.pid").read_text())


def link(name: str) -> dict[str, object] | None:
    out = subprocess.run(["ip", "-j", "link", "show", name], capture_output=True, text=True)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def volume_states(machine: iri.Machine) -> dict[str, tuple[str, int]]:
    return {v.name: (v.handle, v.state) for v in machine.status.volumes}


@pytest.mark.vm
async def test_a_machine_from_create_to_delete(env: Env) -> None:
    client = env.client
    version = await client.call("Version", iri.VersionRequest(version="v1alpha1"))
    assert version.runtime_name == "criserver" and version.runtime_version
    (t1,) = (await client.call("Status", iri.StatusRequest())).machine_class_status
    assert t1.machine_class.name == "t1" and t1.quantity >= 1
    created = await client.call("CreateMachine", iri.CreateMachineRequest(
        machine=new_machine(env.image)))
    m = created.machine.metadata.id
    assert created.machine.status.state == iri.MACHINE_PENDING

    # Pulled, made, booted: RUNNING with the current generation observed.
    booted = await client.wait_settled(m, iri.MACHINE_RUNNING, timeout=180)
    assert booted.status.image_ref == f"{env.registry.host}/iri/e2e-os@{env.digest}"
    assert [(c.type, c.status) for c in booted.status.machine_conditions] == [("Ready", "True")]
    assert volume_states(booted) == {"root": ("oda", iri.VOLUME_ATTACHED)}
    tap0 = network.tap_name(m, "eth0")
    assert [(n.name, n.handle, n.state) for n in booted.status.network_interfaces] == [
        ("eth0", tap0, iri.NETWORK_INTERFACE_ATTACHED)]
    assert {"PullingImage", "ImagePullSucceeded", "MachineStarted"} <= set(
        await client.reasons(m))
    tap = link(tap0)
    assert tap is not None and tap.get("master") == network.bridge_name("net-a")
    # The serial console is kept in a log: the test OS's first line, with what it was given.
    console_log = await wait_for_log(vm_path(env, m) / "vm.log", os_image.MARKER)
    assert (f"{os_image.MARKER} hostname=iri-e2e ignition={len(IGNITION)} disk=vda"
            in console_log)

    async with aiohttp.ClientSession() as http:
        ws = await open_console(env, m, http)
        console = Console.websocket(ws)
        assert await console.run("hostname") == "iri-e2e"
        assert await console.run(f"cat {os_image.IGNITION_PATH}") == IGNITION.decode()
        assert await console.run("cat /sys/class/net/eth0/address") == \
            network.mac_address(m, "eth0")
        assert await console.run("cat /sys/block/vda/size") == str(64 * MiB // 512)
        # One console session per machine.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call("Exec", iri.ExecRequest(machine_id=m))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # Volumes: a local disk hot-plugged, grown live, detached; a host file connected.
        data = iri.Volume(name="data", device="odb", local_disk=iri.LocalDisk(
            size_bytes=16 * MiB))
        await client.call("AttachVolume", iri.AttachVolumeRequest(machine_id=m, volume=data))
        await console.until("cat /sys/block/vdb/size", str(16 * MiB // 512))
        data.local_disk.size_bytes = 32 * MiB
        await client.call("UpdateVolume", iri.UpdateVolumeRequest(machine_id=m, volume=data))
        await console.until("cat /sys/block/vdb/size", str(32 * MiB // 512))
        backing = env.connections / "conn.raw"
        backing.write_bytes(b"\0" * (8 * MiB))
        conn = iri.Volume(name="conn", device="odc", connection=iri.VolumeConnection(
            driver="file", handle=str(backing), effective_storage_bytes=8 * MiB))
        await client.call("AttachVolume", iri.AttachVolumeRequest(machine_id=m, volume=conn))
        await console.until("cat /sys/block/vdc/size", str(8 * MiB // 512))
        attached = await client.wait_settled(m, iri.MACHINE_RUNNING)
        assert volume_states(attached) == {"root": ("oda", iri.VOLUME_ATTACHED),
                                           "data": ("odb", iri.VOLUME_ATTACHED),
                                           "conn": ("odc", iri.VOLUME_ATTACHED)}
        for request, code in (
            (iri.AttachVolumeRequest(machine_id=m, volume=data),
             grpc.StatusCode.ALREADY_EXISTS),
            (iri.DetachVolumeRequest(machine_id=m, name="nope"), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call(type(request).__name__.removesuffix("Request"), request)
            assert err.value.code() == code
        disk_files = set((env.disks / m).iterdir())
        assert len(disk_files) == 2  # root and data
        await client.call("DetachVolume", iri.DetachVolumeRequest(machine_id=m, name="data"))
        await console.until("ls /sys/block | grep -c vdb", "0")
        await client.wait_settled(m, iri.MACHINE_RUNNING)
        assert len(set((env.disks / m).iterdir())) == 1 and backing.exists()

        # A NIC on another network: a tap on that network's bridge, the guest sees its MAC.
        await client.call("AttachNetworkInterface", iri.AttachNetworkInterfaceRequest(
            machine_id=m, network_interface=iri.NetworkInterface(name="eth1",
                                                                 network_id="net-b")))
        await console.until("cat /sys/class/net/eth1/address", network.mac_address(m, "eth1"))
        tap1 = link(network.tap_name(m, "eth1"))
        assert tap1 is not None and tap1.get("master") == network.bridge_name("net-b")
        await client.call("DetachNetworkInterface", iri.DetachNetworkInterfaceRequest(
            machine_id=m, name="eth1"))
        await console.until("ls /sys/class/net | grep -c eth1", "0")
        await client.wait_settled(m, iri.MACHINE_RUNNING)
        assert link(network.tap_name(m, "eth1")) is None
        await ws.close()

    # Annotations change nothing that runs (no generation, no restart).
    await client.call("UpdateMachineAnnotations", iri.UpdateMachineAnnotationsRequest(
        machine_id=m, annotations={"note": "kept"}))
    annotated = await client.get(m)
    assert annotated is not None and dict(annotated.metadata.annotations) == {"note": "kept"}
    assert (await client.reasons(m)).count("MachineStarted") == 1

    # A daemon killed outright: the VM runs on and the next daemon adopts it.
    pid = qemu_pid(env, m)
    env.daemon.stop(signal.SIGKILL)
    env.daemon.start()
    wait_for(env.daemon.workdir / "iri-machine.sock", env.daemon)
    adopted = await client.wait_settled(m, iri.MACHINE_RUNNING)
    assert qemu_pid(env, m) == pid and running(pid)
    assert volume_states(adopted) == {"root": ("oda", iri.VOLUME_ATTACHED),
                                      "conn": ("odc", iri.VOLUME_ATTACHED)}
    async with aiohttp.ClientSession() as http:
        ws = await open_console(env, m, http)
        assert await Console.websocket(ws).run("hostname") == "iri-e2e"
        await ws.close()

    # QEMU dies under a machine that should run: noticed at once (its pidfd), started again.
    starts = (await client.reasons(m)).count("MachineStarted")  # events do not outlive a daemon
    os.kill(pid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 60
    while (await client.reasons(m)).count("MachineStarted") == starts:
        assert asyncio.get_running_loop().time() < deadline, "a dead QEMU was not restarted"
        await asyncio.sleep(0.1)
    await client.wait_settled(m, iri.MACHINE_RUNNING, timeout=180)
    assert qemu_pid(env, m) != pid and running(qemu_pid(env, m))
    pid = qemu_pid(env, m)

    # Power off (the guest obeys the button) and on again (a new boot of the same disk).
    await client.call("UpdateMachinePower", iri.UpdateMachinePowerRequest(
        machine_id=m, power=iri.POWER_OFF))
    await client.wait_settled(m, iri.MACHINE_STOPPED, timeout=60)
    assert not running(pid)
    assert "TriggerShutdownSucceeded" in await client.reasons(m)
    await client.call("UpdateMachinePower", iri.UpdateMachinePowerRequest(
        machine_id=m, power=iri.POWER_ON))
    await client.wait_settled(m, iri.MACHINE_RUNNING, timeout=180)
    assert qemu_pid(env, m) != pid

    # Delete: the button, then everything released and the machine gone.
    pid = qemu_pid(env, m)
    await client.call("DeleteMachine", iri.DeleteMachineRequest(machine_id=m))
    await client.wait(m, lambda machine: machine is None, "gone", timeout=60)
    assert not running(pid)
    assert "MachineDeletionSucceeded" in await client.reasons(m)
    assert link(tap0) is None
    assert not (env.disks / m).exists() and not vm_path(env, m).exists()
    assert backing.exists()  # a connection is the volume provider's, not ours
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("AttachVolume", iri.AttachVolumeRequest(machine_id=m, volume=data))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_image_that_does_not_exist_leaves_nothing_half_made(env: Env) -> None:
    """No VM boots here: the pull fails, is retried and reported, and Delete cleans up."""
    client = env.client
    missing = f"{env.registry.host}/iri/no-such-os:v1"
    created = await client.call("CreateMachine", iri.CreateMachineRequest(
        machine=new_machine(missing)))
    m = created.machine.metadata.id

    async def failed() -> list[Any]:
        events = await client.call("ListEvents", iri.ListEventsRequest(
            filter=iri.EventFilter(id=m)))
        return [e for e in events.events if e.spec.reason == "ReconcileFailed"]

    deadline = asyncio.get_running_loop().time() + 30
    while not (warnings := await failed()):
        assert asyncio.get_running_loop().time() < deadline, await client.reasons(m)
        await asyncio.sleep(0.2)
    assert warnings[0].spec.type == "Warning" and "no-such-os" in warnings[0].spec.message
    machine = await client.get(m)
    assert machine is not None and machine.status.state == iri.MACHINE_PENDING
    assert machine.status.observed_generation == 0  # nothing settled
    assert not (env.disks / m).exists() and not vm_path(env, m).exists()

    await client.call("DeleteMachine", iri.DeleteMachineRequest(machine_id=m))
    await client.wait(m, lambda machine: machine is None, "gone", timeout=30)
    assert link(network.tap_name(m, "eth0")) is None
    assert not (env.disks / m).exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: setattr(m.spec, "class", "t9"), "machine class 't9' is not offered"),
    (lambda m: setattr(m.spec.volumes[0], "device", "sda"), "'sda' is not a device name"),
    (lambda m: setattr(m.spec.volumes[0].local_disk, "size_bytes", 1 << 60),
     "larger than this node allows"),
])
async def test_bad_machines_are_refused_at_create(env: Env, edit: object, message: str) -> None:
    machine = new_machine(env.image)
    edit(machine)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.client.call("CreateMachine", iri.CreateMachineRequest(machine=machine))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(err.value.details())
    assert await env.client.list_ids() == []
