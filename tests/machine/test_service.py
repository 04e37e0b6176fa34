"""The MachineRuntime calls' rules (SEMANTICS.md), on a real store and a recording reconciler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from criserver import __version__
from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.config import MachineClassConfig, MachineConfig
from criserver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from criserver.machine.classes import HostCapacity, MachineClasses
from criserver.machine.events import NORMAL, EventStore
from criserver.machine.service import MachineService
from criserver.machine.servicer import MISSING, machine_runtime_service
from criserver.machine.store import MachineStore
from criserver.store.db import Database

GIB = 1024**3


@dataclass
class RecordingReconciler:
    changes: list[str] = field(default_factory=list)

    def changed(self, machine_id: str) -> None:
        self.changes.append(machine_id)


@dataclass
class FakeConsole:
    asked: list[str] = field(default_factory=list)

    async def exec_url(self, machine_id: str, request: iri.ExecRequest) -> str:
        self.asked.append(machine_id)
        return f"http://127.0.0.1:1/exec/{machine_id}"


@dataclass
class Env:
    service: MachineService
    store: MachineStore
    reconciler: RecordingReconciler
    console: FakeConsole


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    db = await Database.open(tmp_path / "db")
    store = MachineStore(db)
    await store.load()
    reconciler, console = RecordingReconciler(), FakeConsole()
    settings = MachineConfig(classes=[MachineClassConfig("small", 1, 1 * GIB),
                                      MachineClassConfig("big", 4, 8 * GIB)],
                             max_local_disk_bytes=100 * GIB, connection_dirs=["/srv/volumes"])
    service = MachineService(store, EventStore(), MachineClasses(settings.classes), reconciler,
                             console, settings, host=lambda: HostCapacity(8, 32 * GIB))
    try:
        yield Env(service, store, reconciler, console)
    finally:
        await db.close()


def volume(name: str = "root", device: str = "oda", size: int = 10 * GIB,
           image: str = "") -> iri.Volume:
    v = iri.Volume(name=name, device=device)
    v.local_disk.size_bytes = size
    if image:
        v.local_disk.image.image = image
    return v


def connection(name: str, device: str, size: int = GIB) -> iri.Volume:
    return iri.Volume(name=name, device=device, connection=iri.VolumeConnection(
        driver="file", handle=f"/srv/volumes/{name}", effective_storage_bytes=size))


def nic(name: str = "eth0", network_id: str = "net-1") -> iri.NetworkInterface:
    return iri.NetworkInterface(name=name, network_id=network_id, ips=["10.0.0.2"])


def spec_request(class_name: str = "small", labels: dict[str, str] | None = None,
                 volumes: tuple[iri.Volume, ...] = (),
                 nics: tuple[iri.NetworkInterface, ...] = ()) -> iri.CreateMachineRequest:
    m = iri.Machine()
    m.metadata.id = "chosen-by-the-client"
    m.metadata.labels.update(labels or {})
    m.metadata.annotations["note"] = "kept"
    m.metadata.generation = 42
    setattr(m.spec, "class", class_name)
    m.spec.volumes.extend(volumes)
    m.spec.network_interfaces.extend(nics)
    m.spec.ignition_data = b"{}"
    m.spec.guest_config.hostname = "vm1"
    return iri.CreateMachineRequest(machine=m)


async def create(env: Env, **kw: object) -> iri.Machine:
    response = await env.service.create_machine(spec_request(**kw))  # type: ignore[arg-type]
    return response.machine


async def listed(env: Env, machine_id: str = "", **labels: str) -> list[str]:
    response = await env.service.list_machines(iri.ListMachinesRequest(
        filter=iri.MachineFilter(id=machine_id, label_selector=labels)))
    return [m.metadata.id for m in response.machines]


# ---- Version and Status ------------------------------------------------------------------------

async def test_version_names_criserver(env: Env) -> None:
    response = await env.service.version(iri.VersionRequest(version="0.0.1"))
    assert (response.runtime_name, response.runtime_version) == ("criserver", __version__)


async def test_status_lists_classes_with_quantities(env: Env) -> None:
    response = await env.service.status(iri.StatusRequest())
    assert [(s.machine_class.name, s.quantity) for s in response.machine_class_status] == [
        ("small", 8), ("big", 2)]


# ---- Create -----------------------------------------------------------------------------------

async def test_create_answers_pending_with_a_server_id(env: Env) -> None:
    machine = await create(env, labels={"uid": "1"}, volumes=(volume(),), nics=(nic(),))
    assert machine.metadata.id != "chosen-by-the-client"
    assert len(machine.metadata.id) == 63
    assert machine.metadata.labels == {"uid": "1"}
    assert machine.metadata.annotations == {"note": "kept"}
    assert machine.metadata.generation == 1
    assert machine.metadata.created_at > 0 and machine.metadata.deleted_at == 0
    assert machine.status.state == iri.MACHINE_PENDING
    assert machine.status.observed_generation == 0
    assert getattr(machine.spec, "class") == "small"
    assert machine.spec.guest_config.hostname == "vm1"
    assert env.store.require(machine.metadata.id) == machine
    assert env.reconciler.changes == [machine.metadata.id]


async def test_create_is_not_idempotent(env: Env) -> None:
    a = await create(env, labels={"uid": "1"})
    b = await create(env, labels={"uid": "1"})
    assert a.metadata.id != b.metadata.id
    assert len(await listed(env, uid="1")) == 2


async def test_an_unknown_class_is_invalid(env: Env) -> None:
    with pytest.raises(InvalidArgument, match=r"'huge' is not offered.*small, big"):
        await create(env, class_name="huge")
    with pytest.raises(InvalidArgument, match=r"machine\.spec\.class is required"):
        await create(env, class_name="")
    with pytest.raises(InvalidArgument, match="machine is required"):
        await env.service.create_machine(iri.CreateMachineRequest())
    assert env.store.ids() == [] and env.reconciler.changes == []


@pytest.mark.parametrize(("volumes", "error"), [
    ((volume(size=101 * GIB),), "larger than this node allows"),
    ((volume(size=-1),), "negative"),
    ((volume(device="vda"),), "'vda' is not a device name"),
    ((volume(device="odaaa"),), "not a device name"),
    ((volume(device=""),), "not a device name"),
    ((volume(name=""),), "volume.name is required"),
    ((iri.Volume(name="x", device="odb"),), "exactly one of local_disk and connection"),
    ((volume("a", "oda"), volume("a", "odb")), "volume a is already attached"),
    ((volume("a", "oda"), volume("b", "oda")), "device oda is already used"),
    ((iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(driver="file")),),
     "connection.handle is required"),
    ((volume(image="Registry.example/OS:1"),), "volume root: local_disk.image: invalid image"),
    ((volume(size=0),), "a local_disk without an image needs size_bytes"),
    ((iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(
        driver="ceph", handle="pool/image")),), "connection.driver 'ceph' is not supported"),
    ((iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(
        driver="file", handle="/etc/shadow")),), "outside the directories this node allows"),
    ((iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(
        driver="file", handle="/srv/volumes/../../etc/shadow")),), "without '..'"),
    ((iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(
        driver="file", handle="/srv/volumes")),), "outside the directories"),
    ((iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(
        driver="file", handle="srv/volumes/x")),), "not an absolute path"),
])
async def test_bad_volumes_are_refused_at_create(
        env: Env, volumes: tuple[iri.Volume, ...], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        await create(env, volumes=volumes)
    assert env.store.ids() == []


async def test_device_names_as_the_reference(env: Env) -> None:
    machine = await create(env, volumes=(volume("a", "oda", image="registry.example/os/debian:12"),
                                         volume("b", "odz"),
                                         volume("c", "odaa"), connection("d", "odzz")))
    assert [v.device for v in machine.spec.volumes] == ["oda", "odz", "odaa", "odzz"]


@pytest.mark.parametrize(("nics", "error"), [
    ((nic(name=""),), "network_interface.name is required"),
    ((nic(network_id=""),), "network_id is required"),
    ((nic("a"), nic("a")), "network interface a is already attached"),
])
async def test_bad_nics_are_refused_at_create(
        env: Env, nics: tuple[iri.NetworkInterface, ...], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        await create(env, nics=nics)


# ---- List -------------------------------------------------------------------------------------

async def test_label_filters_are_exact(env: Env) -> None:
    a = (await create(env, labels={"uid": "1", "pool": "p"})).metadata.id
    b = (await create(env, labels={"uid": "2", "pool": "p"})).metadata.id
    assert await listed(env) == [a, b]
    assert await listed(env, pool="p") == [a, b]
    assert await listed(env, uid="1") == [a]
    assert await listed(env, uid="1", pool="p") == [a]
    assert await listed(env, uid="1", pool="q") == []
    assert await listed(env, uid="") == []


async def test_list_by_id_is_empty_not_not_found(env: Env) -> None:
    a = (await create(env, labels={"uid": "1"})).metadata.id
    assert await listed(env, a) == [a]
    assert await listed(env, "nope") == []
    assert await listed(env, a, uid="2") == []


# ---- Delete -----------------------------------------------------------------------------------

async def test_delete_is_asynchronous_and_repeatable(env: Env) -> None:
    m = (await create(env)).metadata.id
    await env.service.delete_machine(iri.DeleteMachineRequest(machine_id=m))
    machine = env.store.require(m)
    assert machine.metadata.deleted_at >= machine.metadata.created_at
    assert machine.status.state == iri.MACHINE_TERMINATING
    assert machine.metadata.generation == 1
    assert await listed(env) == [m]
    deleted_at = machine.metadata.deleted_at
    await env.service.delete_machine(iri.DeleteMachineRequest(machine_id=m))
    assert env.store.require(m).metadata.deleted_at == deleted_at
    assert env.reconciler.changes == [m, m, m]


async def test_delete_of_an_unknown_id_is_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        await env.service.delete_machine(iri.DeleteMachineRequest(machine_id="nope"))
    with pytest.raises(InvalidArgument):
        await env.service.delete_machine(iri.DeleteMachineRequest())


async def test_a_deleting_machine_takes_no_more_changes(env: Env) -> None:
    m = (await create(env, volumes=(volume(),))).metadata.id
    await env.service.delete_machine(iri.DeleteMachineRequest(machine_id=m))
    with pytest.raises(FailedPrecondition, match="being deleted"):
        await env.service.attach_volume(iri.AttachVolumeRequest(
            machine_id=m, volume=volume("data", "odb")))
    with pytest.raises(FailedPrecondition):
        await env.service.update_machine_power(iri.UpdateMachinePowerRequest(
            machine_id=m, power=iri.POWER_OFF))
    with pytest.raises(FailedPrecondition):
        await env.service.exec(iri.ExecRequest(machine_id=m))
    # Annotations are metadata, not a change to the machine.
    await env.service.update_machine_annotations(iri.UpdateMachineAnnotationsRequest(
        machine_id=m, annotations={"a": "b"}))


# ---- Annotations and power -----------------------------------------------------------------

async def test_annotations_are_replaced_without_a_new_generation(env: Env) -> None:
    m = (await create(env)).metadata.id
    await env.service.update_machine_annotations(iri.UpdateMachineAnnotationsRequest(
        machine_id=m, annotations={"a": "1"}))
    machine = env.store.require(m)
    assert machine.metadata.annotations == {"a": "1"}
    assert machine.metadata.generation == 1
    with pytest.raises(NotFound):
        await env.service.update_machine_annotations(iri.UpdateMachineAnnotationsRequest(
            machine_id="nope"))


async def test_power_is_stored_and_bumps_the_generation(env: Env) -> None:
    m = (await create(env)).metadata.id
    await env.service.update_machine_power(iri.UpdateMachinePowerRequest(
        machine_id=m, power=iri.POWER_OFF))
    machine = env.store.require(m)
    assert machine.spec.power == iri.POWER_OFF
    assert machine.metadata.generation == 2
    assert env.reconciler.changes == [m, m]
    with pytest.raises(NotFound):
        await env.service.update_machine_power(iri.UpdateMachinePowerRequest(machine_id="nope"))
    with pytest.raises(InvalidArgument):
        await env.service.update_machine_power(iri.UpdateMachinePowerRequest())


async def test_an_undefined_power_is_invalid(env: Env) -> None:
    """Proto3 enums are open: irictl-machine's `update power --power 7` arrived as 7, was
    stored, and the reconciler read it as off."""
    m = (await create(env)).metadata.id
    with pytest.raises(InvalidArgument, match=r"power 7 is not one of POWER_ON \(0\), "
                                              r"POWER_OFF \(1\)"):
        await env.service.update_machine_power(iri.UpdateMachinePowerRequest(
            machine_id=m, power=7))  # type: ignore[arg-type]
    assert env.store.require(m).metadata.generation == 1
    request = spec_request()
    request.machine.spec.power = -1  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="power -1 is not one of"):
        await env.service.create_machine(request)
    assert env.store.ids() == [m]


# ---- Volumes ----------------------------------------------------------------------------------

async def test_attach_detach_and_update_volumes(env: Env) -> None:
    m = (await create(env, volumes=(volume(),))).metadata.id
    await env.service.attach_volume(iri.AttachVolumeRequest(
        machine_id=m, volume=connection("data", "odb", GIB)))
    assert [v.name for v in env.store.require(m).spec.volumes] == ["root", "data"]
    await env.service.update_volume(iri.UpdateVolumeRequest(
        machine_id=m, volume=connection("data", "odb", 2 * GIB)))
    assert env.store.require(m).spec.volumes[1].connection.effective_storage_bytes == 2 * GIB
    await env.service.update_volume(iri.UpdateVolumeRequest(
        machine_id=m, volume=volume(size=20 * GIB)))
    assert env.store.require(m).spec.volumes[0].local_disk.size_bytes == 20 * GIB
    await env.service.detach_volume(iri.DetachVolumeRequest(machine_id=m, name="root"))
    machine = env.store.require(m)
    assert [v.name for v in machine.spec.volumes] == ["data"]
    assert machine.metadata.generation == 5
    assert env.reconciler.changes == [m] * 5


async def test_volume_errors(env: Env) -> None:
    m = (await create(env, volumes=(volume(),))).metadata.id
    attach, detach, update = (env.service.attach_volume, env.service.detach_volume,
                              env.service.update_volume)
    with pytest.raises(AlreadyExists, match="volume root is already attached"):
        await attach(iri.AttachVolumeRequest(machine_id=m, volume=volume(device="odb")))
    with pytest.raises(AlreadyExists, match="device oda"):
        await attach(iri.AttachVolumeRequest(machine_id=m, volume=volume("data", "oda")))
    with pytest.raises(InvalidArgument, match="not a device name"):
        await attach(iri.AttachVolumeRequest(machine_id=m, volume=volume("data", "sda")))
    with pytest.raises(InvalidArgument, match="larger than this node allows"):
        await attach(iri.AttachVolumeRequest(machine_id=m,
                                             volume=volume("data", "odb", 200 * GIB)))
    with pytest.raises(InvalidArgument, match="volume is required"):
        await attach(iri.AttachVolumeRequest(machine_id=m))
    with pytest.raises(InvalidArgument, match="machine_id is required"):
        await attach(iri.AttachVolumeRequest(volume=volume("data", "odb")))
    with pytest.raises(NotFound, match="machine nope"):
        await attach(iri.AttachVolumeRequest(machine_id="nope", volume=volume("data", "odb")))
    with pytest.raises(NotFound, match="volume data not found"):
        await detach(iri.DetachVolumeRequest(machine_id=m, name="data"))
    with pytest.raises(InvalidArgument, match="name is required"):
        await detach(iri.DetachVolumeRequest(machine_id=m))
    with pytest.raises(NotFound, match="volume data not found"):
        await update(iri.UpdateVolumeRequest(machine_id=m, volume=volume("data", "odb")))
    with pytest.raises(InvalidArgument, match="disks only grow"):
        await update(iri.UpdateVolumeRequest(machine_id=m, volume=volume(size=GIB)))
    with pytest.raises(InvalidArgument, match="device cannot change"):
        await update(iri.UpdateVolumeRequest(machine_id=m, volume=volume(device="odb")))
    with pytest.raises(InvalidArgument, match="cannot become a connection"):
        await update(iri.UpdateVolumeRequest(machine_id=m, volume=connection("root", "oda")))
    assert env.store.require(m).metadata.generation == 1
    assert env.reconciler.changes == [m]


# ---- Network interfaces ---------------------------------------------------------------------

async def test_attach_and_detach_nics(env: Env) -> None:
    m = (await create(env, nics=(nic(),))).metadata.id
    await env.service.attach_network_interface(iri.AttachNetworkInterfaceRequest(
        machine_id=m, network_interface=nic("eth1", "net-2")))
    assert [n.name for n in env.store.require(m).spec.network_interfaces] == ["eth0", "eth1"]
    await env.service.detach_network_interface(iri.DetachNetworkInterfaceRequest(
        machine_id=m, name="eth0"))
    machine = env.store.require(m)
    assert [n.network_id for n in machine.spec.network_interfaces] == ["net-2"]
    assert machine.metadata.generation == 3


async def test_nic_errors(env: Env) -> None:
    m = (await create(env, nics=(nic(),))).metadata.id
    attach, detach = env.service.attach_network_interface, env.service.detach_network_interface
    with pytest.raises(AlreadyExists, match="eth0 is already attached"):
        await attach(iri.AttachNetworkInterfaceRequest(machine_id=m, network_interface=nic()))
    with pytest.raises(InvalidArgument, match="network_id is required"):
        await attach(iri.AttachNetworkInterfaceRequest(
            machine_id=m, network_interface=nic("eth1", "")))
    with pytest.raises(InvalidArgument, match="network_interface is required"):
        await attach(iri.AttachNetworkInterfaceRequest(machine_id=m))
    with pytest.raises(NotFound):
        await attach(iri.AttachNetworkInterfaceRequest(machine_id="nope",
                                                       network_interface=nic("eth1")))
    with pytest.raises(NotFound, match="network interface eth9 not found"):
        await detach(iri.DetachNetworkInterfaceRequest(machine_id=m, name="eth9"))
    with pytest.raises(InvalidArgument):
        await detach(iri.DetachNetworkInterfaceRequest(machine_id=m))


# ---- Exec and events ------------------------------------------------------------------------

async def test_exec_checks_the_machine_then_asks_the_console(env: Env) -> None:
    m = (await create(env)).metadata.id
    response = await env.service.exec(iri.ExecRequest(machine_id=m))
    assert response.url == f"http://127.0.0.1:1/exec/{m}"
    with pytest.raises(NotFound):
        await env.service.exec(iri.ExecRequest(machine_id="nope"))
    with pytest.raises(InvalidArgument):
        await env.service.exec(iri.ExecRequest())
    assert env.console.asked == [m]


async def test_list_events_filters_as_asked(env: Env) -> None:
    a = await create(env, labels={"uid": "1"})
    b = await create(env, labels={"uid": "2"})
    env.service.events.record(a, NORMAL, "PullingImage", "", "Pull")
    env.service.events.record(b, NORMAL, "PullingImage", "", "Pull")
    response = await env.service.list_events(iri.ListEventsRequest(
        filter=iri.EventFilter(label_selector={"uid": "2"})))
    assert [e.spec.involved_object_meta.id for e in response.events] == [b.metadata.id]
    everything = await env.service.list_events(iri.ListEventsRequest())
    assert len(everything.events) == 2


def test_the_table_implements_every_call_of_the_proto(env: Env) -> None:
    service = iri.DESCRIPTOR.services_by_name["MachineRuntime"]
    table = machine_runtime_service(env.service)
    assert set(table) == set(service.methods_by_name)
    assert MISSING == {}
