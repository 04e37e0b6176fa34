"""The reconciler's decisions, against in-memory stand-ins for the store, the VMs, the volumes
and the taps (the e2e tests run the same passes on real QEMU)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.api.iri.meta.v1alpha1 import api_pb2 as meta
from criserver.errors import Internal
from criserver.machine.driver import (
    Boot,
    KernelBoot,
    MachineDisk,
    MachineNic,
    Shape,
    device_id,
    nic_device_id,
)
from criserver.machine.reconciler import PreparedVolume, Reconciler, ReconcileSettings

FAST = ReconcileSettings(delete_grace=0.4, power_off_grace=0.4, button_interval=0.1,
                         retry_min=0.05, retry_max=0.2, resync_interval=3600)


class Store:
    def __init__(self) -> None:
        self.machines: dict[str, iri.Machine] = {}

    def get(self, machine_id: str) -> iri.Machine | None:
        found = self.machines.get(machine_id)
        if found is None:
            return None
        copy = iri.Machine()
        copy.CopyFrom(found)
        return copy

    def ids(self) -> list[str]:
        return list(self.machines)

    async def update_status(self, machine_id: str,
                            update: Callable[[iri.Machine], None]) -> None:
        if machine_id in self.machines:
            update(self.machines[machine_id])

    async def remove(self, machine_id: str) -> None:
        self.machines.pop(machine_id, None)

    def edit(self, machine_id: str, change: Callable[[iri.Machine], None]) -> None:
        change(self.machines[machine_id])
        self.machines[machine_id].metadata.generation += 1


@dataclass
class Events:
    seen: list[tuple[str, str]] = field(default_factory=list)

    def record(self, metadata: meta.ObjectMetadata, type: str, reason: str, message: str,
               action: str) -> None:
        assert action
        self.seen.append((type, reason))

    def reasons(self) -> list[str]:
        return [reason for _, reason in self.seen]


@dataclass
class Driver:
    on: dict[str, set[str]] = field(default_factory=dict)  # machine -> attached device ids
    boots: list[tuple[str, Boot, list[str], list[str]]] = field(default_factory=list)
    buttons: int = 0
    kills: int = 0
    resized: list[tuple[str, int]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    reconciler: Reconciler | None = None
    obey_button: bool = False

    def running(self, machine_id: str) -> bool:
        return machine_id in self.on

    def pid(self, machine_id: str) -> int | None:
        return 4242 if machine_id in self.on else None

    async def adopt(self, machine_id: str) -> bool:
        return machine_id in self.on

    async def start(self, machine_id: str, shape: Shape, boot: Boot, disks: list[MachineDisk],
                    nics: list[MachineNic], ignition: bytes, hostname: str) -> None:
        self.boots.append((machine_id, boot, [d.device for d in disks], [n.name for n in nics]))
        self.on[machine_id] = {device_id(d.device) for d in disks} | {
            nic_device_id(n.name) for n in nics}

    async def press_power_button(self, machine_id: str) -> None:
        self.buttons += 1
        if self.obey_button:
            self.exit(machine_id, guest_powered_off=True)

    async def kill(self, machine_id: str) -> None:
        self.kills += 1
        self.exit(machine_id, guest_powered_off=False)

    def exit(self, machine_id: str, guest_powered_off: bool) -> None:
        self.on.pop(machine_id, None)
        assert self.reconciler is not None
        self.reconciler.vm_exited(machine_id, guest_powered_off)

    async def forget(self, machine_id: str) -> None:
        self.forgotten.append(machine_id)

    async def attached(self, machine_id: str) -> set[str]:
        return set(self.on[machine_id])

    async def add_disk(self, machine_id: str, disk: MachineDisk) -> None:
        self.on[machine_id].add(device_id(disk.device))

    async def remove_disk(self, machine_id: str, disk: MachineDisk) -> None:
        self.on[machine_id].discard(device_id(disk.device))

    async def resize_disk(self, machine_id: str, disk: MachineDisk, size_bytes: int) -> None:
        self.resized.append((disk.device, size_bytes))

    async def add_nic(self, machine_id: str, nic: MachineNic) -> None:
        self.on[machine_id].add(nic_device_id(nic.name))

    async def remove_nic(self, machine_id: str, nic_name: str) -> None:
        self.on[machine_id].discard(nic_device_id(nic_name))


@dataclass
class Volumes:
    prepared: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    grown: list[tuple[str, int]] = field(default_factory=list)
    fail_next: int = 0

    async def prepare(self, machine: iri.Machine, volume: iri.Volume) -> PreparedVolume:
        if self.fail_next:
            self.fail_next -= 1
            raise Internal("the registry is down")
        self.prepared.append(volume.name)
        disk = MachineDisk(volume.device, Path(f"/disks/{volume.name}"))
        size = self.size_bytes(volume)
        if volume.local_disk.image.image:
            boot = KernelBoot(Path("/img/kernel"), Path("/img/initramfs"), "console=ttyS0")
            return PreparedVolume(disk, volume.local_disk.image.image, boot, size)
        return PreparedVolume(disk, size_bytes=size)

    async def grow(self, machine_id: str, volume: iri.Volume, size_bytes: int) -> None:
        self.grown.append((volume.name, size_bytes))

    async def release(self, machine_id: str, volume_name: str) -> None:
        self.released.append(volume_name)

    def size_bytes(self, volume: iri.Volume) -> int:
        return volume.local_disk.size_bytes or volume.connection.effective_storage_bytes


class Classes:
    def shape(self, class_name: str) -> Shape | None:
        return Shape(2, 512) if class_name == "small" else None


@dataclass
class Nics:
    taps: dict[tuple[str, str], str] = field(default_factory=dict)

    async def plug(self, machine_id: str, nic_name: str, network_id: str) -> str:
        return self.taps.setdefault((machine_id, nic_name), f"tap-{nic_name}")

    async def unplug(self, machine_id: str, nic_name: str, network_id: str) -> None:
        self.taps.pop((machine_id, nic_name), None)

    async def unplug_tap(self, machine_id: str, nic_name: str) -> None:
        self.taps.pop((machine_id, nic_name), None)

    def mac_address(self, machine_id: str, nic_name: str) -> str:
        return "02:00:00:00:00:01"


@dataclass
class World:
    store: Store
    events: Events
    driver: Driver
    volumes: Volumes
    nics: Nics
    reconciler: Reconciler

    def add(self, machine_id: str, class_name: str = "small", power: int = iri.POWER_ON,
            image: str = "registry.test/os:1") -> None:
        machine = iri.Machine(
            metadata=meta.ObjectMetadata(id=machine_id, generation=1, created_at=1),
            spec=iri.MachineSpec(power=power, volumes=[
                iri.Volume(name="root", device="oda", local_disk=iri.LocalDisk(
                    size_bytes=1 << 30, image=iri.ImageSpec(image=image))),
                iri.Volume(name="data", device="odb", local_disk=iri.LocalDisk(
                    size_bytes=1 << 20)),
            ], network_interfaces=[iri.NetworkInterface(name="eth0", network_id="net-a")]),
        )
        setattr(machine.spec, "class", class_name)
        self.store.machines[machine_id] = machine
        self.reconciler.changed(machine_id)

    def status(self, machine_id: str) -> iri.MachineStatus:
        return self.store.machines[machine_id].status

    async def settle(self) -> None:
        await asyncio.wait_for(self.reconciler.idle(), 10)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    store, events, driver, volumes, nics = Store(), Events(), Driver(), Volumes(), Nics()
    reconciler = Reconciler(store, events, driver, volumes, Classes(), FAST, nics=nics)
    driver.reconciler = reconciler
    try:
        yield World(store, events, driver, volumes, nics, reconciler)
    finally:
        await reconciler.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_a_new_machine_boots_its_image_with_every_device_and_reports_running(
    world: World,
) -> None:
    world.add("m1")
    await world.settle()
    [(machine_id, boot, disks, nics)] = world.driver.boots
    assert machine_id == "m1" and isinstance(boot, KernelBoot)
    assert disks == ["oda", "odb"] and nics == ["eth0"]
    status = world.status("m1")
    assert status.state == iri.MACHINE_RUNNING and status.observed_generation == 1
    assert status.image_ref == "registry.test/os:1"
    assert [(v.name, v.handle, v.state) for v in status.volumes] == [
        ("root", "oda", iri.VOLUME_ATTACHED), ("data", "odb", iri.VOLUME_ATTACHED)]
    assert [(n.name, n.state) for n in status.network_interfaces] == [
        ("eth0", iri.NETWORK_INTERFACE_ATTACHED)]
    assert "MachineStarted" in world.events.reasons()
    assert [(c.type, c.status, c.reason) for c in status.machine_conditions] == [
        ("Ready", "True", "Running")]


async def test_spec_changes_are_hot_plugged_into_the_running_vm(world: World) -> None:
    world.add("m1")
    await world.settle()
    world.store.edit("m1", lambda m: (
        m.spec.volumes.remove(m.spec.volumes[1]),
        m.spec.volumes.add(name="extra", device="odc", local_disk=iri.LocalDisk(size_bytes=5)),
        m.spec.network_interfaces.add(name="eth1", network_id="net-b"),
        m.spec.volumes[0].local_disk.__setattr__("size_bytes", 2 << 30),
    ))
    world.reconciler.changed("m1")
    await world.settle()
    assert len(world.driver.boots) == 1  # no restart
    assert world.driver.on["m1"] == {"vol-oda", "vol-odc", "nic-eth0", "nic-eth1"}
    assert world.volumes.released == ["data"]
    assert world.driver.resized == [("oda", 2 << 30)]
    assert world.status("m1").observed_generation == 2
    for reason in ("DetachVolumeSucceeded", "AttachVolumeSucceeded", "AttachNICSucceeded",
                   "ResizeVolumeSucceeded"):
        assert reason in world.events.reasons()

    world.store.edit("m1", lambda m: m.spec.network_interfaces.remove(
        m.spec.network_interfaces[0]))
    world.reconciler.changed("m1")
    await world.settle()
    assert "nic-eth0" not in world.driver.on["m1"] and ("m1", "eth0") not in world.nics.taps


async def test_power_off_presses_the_button_and_power_on_boots_again(world: World) -> None:
    world.driver.obey_button = True
    world.add("m1")
    await world.settle()
    world.store.edit("m1", lambda m: setattr(m.spec, "power", iri.POWER_OFF))
    world.reconciler.changed("m1")
    await until(lambda: world.status("m1").state == iri.MACHINE_STOPPED)
    assert world.driver.buttons == 1 and world.driver.kills == 0
    assert [(c.status, c.reason) for c in world.status("m1").machine_conditions] == [
        ("False", "Stopped")]
    assert world.status("m1").observed_generation == 2

    # Grown while off: the file grows before the boot, QEMU is not asked.
    world.store.edit("m1", lambda m: (setattr(m.spec, "power", iri.POWER_ON),
                                      m.spec.volumes[1].local_disk.__setattr__("size_bytes",
                                                                               2 << 20)))
    world.reconciler.changed("m1")
    await until(lambda: world.status("m1").state == iri.MACHINE_RUNNING)
    assert len(world.driver.boots) == 2
    assert world.volumes.grown == [("data", 2 << 20)] and world.driver.resized == []


async def test_a_guest_that_powers_off_stays_off_but_a_crashed_qemu_restarts(
    world: World,
) -> None:
    world.add("m1")
    await world.settle()
    world.driver.exit("m1", guest_powered_off=False)  # QEMU died under the guest
    await until(lambda: len(world.driver.boots) == 2)
    await world.settle()
    assert world.status("m1").state == iri.MACHINE_RUNNING

    world.driver.exit("m1", guest_powered_off=True)
    await world.settle()
    assert world.status("m1").state == iri.MACHINE_STOPPED
    assert len(world.driver.boots) == 2


async def test_delete_waits_for_the_guest_then_stops_it_and_releases_everything(
    world: World,
) -> None:
    world.add("m1")
    await world.settle()
    world.store.machines["m1"].metadata.deleted_at = 5
    world.reconciler.changed("m1")
    await until(lambda: world.status("m1").state == iri.MACHINE_TERMINATING)
    await until(lambda: "m1" not in world.store.machines)
    assert world.driver.buttons >= 3  # pressed again while the guest ignored it
    assert world.driver.kills == 1  # then the grace ran out
    assert sorted(world.volumes.released) == ["data", "root"]
    assert world.nics.taps == {} and world.driver.forgotten == ["m1"]
    assert world.events.reasons()[-1] == "MachineDeletionSucceeded"


async def test_failures_are_retried_and_reported(world: World) -> None:
    world.volumes.fail_next = 2
    world.add("m1")
    await until(lambda: world.status("m1").state == iri.MACHINE_RUNNING)
    assert world.events.reasons().count("ReconcileFailed") == 2
    assert ("Warning", "ReconcileFailed") in world.events.seen

    world.add("m2", class_name="huge")
    await until(lambda: "ReconcileFailed" in world.events.reasons()[2:])
    assert world.status("m2").state == iri.MACHINE_PENDING
    assert world.status("m2").observed_generation == 0
    (ready,) = world.status("m2").machine_conditions
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "ReconcileFailed")
    assert "machine class 'huge' is not offered" in ready.message
