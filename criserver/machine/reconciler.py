"""Drives each machine's QEMU towards the desired state the RPCs wrote, and reports what is.

RPCs only write the store and call `changed(id)`. Here, one machine at a time per task (many
machines at once), a pass compares the machine's spec with its VM: prepares volumes and NICs,
starts or powers off the VM, hot-plugs what was attached or detached, grows disks, and on
delete presses the power button until the guest is off or the grace is over, then releases
everything and drops the machine. Every pass ends by writing the observed status. A pass that
fails is retried with backoff; VM exits and timers queue passes too, so nothing waits on a
client's next call. State machine: PENDING until the VM runs, RUNNING, STOPPED when powered
off (by the spec or by the guest itself), TERMINATING once deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.api.iri.meta.v1alpha1 import api_pb2 as meta
from criserver.errors import CriError, NotFound
from criserver.machine import network
from criserver.machine.conditions import FALSE, TRUE, set_condition
from criserver.machine.driver import (
    Boot,
    DiskBoot,
    MachineDisk,
    MachineNic,
    Shape,
    device_id,
    nic_device_id,
)

log = logging.getLogger(__name__)

NORMAL, WARNING = "Normal", "Warning"
# The one condition a machine's status carries: True once it runs as its spec says, else
# False with why (its state, or the last failure while retrying).
READY = "Ready"


class Driver(Protocol):
    """The VM side (machine/driver.py's MachineDriver)."""

    def running(self, machine_id: str) -> bool: ...
    def pid(self, machine_id: str) -> int | None: ...
    async def adopt(self, machine_id: str) -> bool: ...
    async def start(self, machine_id: str, shape: Shape, boot: Boot, disks: list[MachineDisk],
                    nics: list[MachineNic], ignition: bytes, hostname: str) -> None: ...
    async def press_power_button(self, machine_id: str) -> None: ...
    async def kill(self, machine_id: str) -> None: ...
    async def forget(self, machine_id: str) -> None: ...
    async def attached(self, machine_id: str) -> set[str]: ...
    async def add_disk(self, machine_id: str, disk: MachineDisk) -> None: ...
    async def remove_disk(self, machine_id: str, disk: MachineDisk) -> None: ...
    async def resize_disk(self, machine_id: str, disk: MachineDisk, size_bytes: int) -> None: ...
    async def add_nic(self, machine_id: str, nic: MachineNic) -> None: ...
    async def remove_nic(self, machine_id: str, nic_name: str) -> None: ...


class MachineStore(Protocol):
    def get(self, machine_id: str) -> iri.Machine | None: ...
    def ids(self) -> list[str]: ...
    async def update_status(self, machine_id: str,
                            update: Callable[[iri.Machine], None]) -> None: ...
    async def remove(self, machine_id: str) -> None: ...


class EventRecorder(Protocol):
    def record(self, metadata: meta.ObjectMetadata, type: str, reason: str, message: str,
               action: str) -> None: ...


@dataclass(frozen=True)
class PreparedVolume:
    disk: MachineDisk
    image_ref: str = ""  # the OS image the disk was made from
    boot: Boot | None = None  # how the OS image boots, for the volume that has one
    size_bytes: int = 0  # how large the disk is now (a spec asking for more grows it)


class Volumes(Protocol):
    """Disks for volumes: made (and OS images pulled) on first use, released on detach."""

    async def prepare(self, machine: iri.Machine, volume: iri.Volume) -> PreparedVolume: ...
    async def grow(self, machine_id: str, volume: iri.Volume, size_bytes: int) -> None:
        """Grow the disk of a machine whose VM is off (a running VM grows it over QMP)."""
    async def release(self, machine_id: str, volume_name: str) -> None: ...
    def size_bytes(self, volume: iri.Volume) -> int: ...


class Classes(Protocol):
    def shape(self, class_name: str) -> Shape | None: ...


class NicPlumbing(Protocol):
    """Host taps for NICs: machine/network.py (the module itself satisfies this)."""

    async def plug(self, machine_id: str, nic_name: str, network_id: str) -> str: ...
    async def unplug(self, machine_id: str, nic_name: str, network_id: str) -> None: ...
    async def unplug_tap(self, machine_id: str, nic_name: str) -> None: ...
    def mac_address(self, machine_id: str, nic_name: str) -> str: ...


@dataclass(frozen=True)
class ReconcileSettings:
    delete_grace: float = 300.0  # power button presses before a hard stop (reference: 5 min)
    power_off_grace: float = 120.0
    button_interval: float = 10.0  # the button is pressed again while the guest ignores it
    retry_min: float = 1.0
    retry_max: float = 60.0
    resync_interval: float = 30.0


@dataclass
class _Machine:
    """What the reconciler remembers of a machine between passes (not persisted: rebuilt)."""

    volumes: dict[str, PreparedVolume] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    nics: dict[str, MachineNic] = field(default_factory=dict)
    stopping_since: float | None = None
    last_button: float = 0.0
    guest_off_generation: int | None = None  # the guest powered itself off at this generation
    failures: int = 0


class Reconciler:
    def __init__(self, store: MachineStore, events: EventRecorder, driver: Driver,
                 volumes: Volumes, classes: Classes,
                 settings: ReconcileSettings = ReconcileSettings(),
                 nics: NicPlumbing = network) -> None:
        self._store = store
        self._events = events
        self._driver = driver
        self._volumes = volumes
        self._classes = classes
        self._settings = settings
        self._nics = nics
        self._known: dict[str, _Machine] = {}
        self._dirty: set[str] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._resync: asyncio.Task[None] | None = None
        self._closing = False

    # --- the seam the service calls -----------------------------------------------------------

    def changed(self, machine_id: str) -> None:
        """The machine's desired state changed (or may have): reconcile it soon."""
        if self._closing:
            return
        self._dirty.add(machine_id)
        if machine_id not in self._workers:
            self._workers[machine_id] = asyncio.create_task(
                self._work(machine_id), name=f"reconcile-{machine_id}")

    def vm_exited(self, machine_id: str, guest_powered_off: bool) -> None:
        """The driver's exit callback."""
        state = self._known.setdefault(machine_id, _Machine())
        machine = self._store.get(machine_id)
        if guest_powered_off and machine is not None:
            state.guest_off_generation = machine.metadata.generation
        self.changed(machine_id)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Re-adopt the VMs an earlier daemon left and reconcile every machine."""
        for machine_id in self._store.ids():
            try:
                await self._driver.adopt(machine_id)
            except CriError as exc:
                log.warning("machine vm not adopted machine=%s: %s", machine_id, exc.message)
            self.changed(machine_id)
        self._resync = asyncio.create_task(self._resync_loop(), name="machine-resync")

    async def close(self) -> None:
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        tasks = [*self._workers.values(), *([self._resync] if self._resync else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no pass is queued or running (tests)."""
        while self._workers:
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    # --- passes -------------------------------------------------------------------------------

    async def _work(self, machine_id: str) -> None:
        try:
            while machine_id in self._dirty and not self._closing:
                self._dirty.discard(machine_id)
                await self._pass(machine_id)
        finally:
            self._workers.pop(machine_id, None)
            if machine_id in self._dirty and not self._closing:
                self.changed(machine_id)  # queued while this worker was ending

    async def _pass(self, machine_id: str) -> None:
        machine = self._store.get(machine_id)
        if machine is None:
            self._known.pop(machine_id, None)
            return
        state = self._known.setdefault(machine_id, _Machine())
        try:
            if machine.metadata.deleted_at:
                await self._delete(machine, state)
            else:
                await self._converge(machine, state)
            state.failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.failures += 1
            delay = min(self._settings.retry_max,
                        self._settings.retry_min * 2 ** (state.failures - 1))
            message = exc.message if isinstance(exc, CriError) else repr(exc)
            log.warning("machine reconcile failed machine=%s retry_in=%.0fs: %s",
                        machine_id, delay, message, exc_info=not isinstance(exc, CriError))
            self._events.record(machine.metadata, WARNING, "ReconcileFailed", message,
                                "Reconcile")
            self._later(machine_id, delay)
            with contextlib.suppress(Exception):
                await self._report(machine, state, failed=message)

    async def _converge(self, machine: iri.Machine, state: _Machine) -> None:
        machine_id = machine.metadata.id
        want_on = machine.spec.power == iri.POWER_ON
        if state.guest_off_generation not in (None, machine.metadata.generation):
            state.guest_off_generation = None  # the client changed the spec since: act on it
        if not want_on or state.guest_off_generation is not None:
            await self._power_off(machine, state)
            await self._report(machine, state)
            return
        state.stopping_since = None
        await self._prepare_nics(machine, state)
        await self._prepare_volumes(machine, state)
        if not self._driver.running(machine_id):
            await self._grow_offline(machine, state)
            await self._boot(machine, state)
        else:
            await self._sync_devices(machine, state)
        await self._report(machine, state)

    async def _boot(self, machine: iri.Machine, state: _Machine) -> None:
        machine_id = machine.metadata.id
        class_name = getattr(machine.spec, "class")  # a Python keyword as a field name
        shape = self._classes.shape(class_name)
        if shape is None:
            raise NotFound(f"machine class {class_name!r} is not offered on this host")
        wanted = [v.name for v in machine.spec.volumes]
        prepared = [state.volumes[name] for name in wanted]
        bootable = [p for p in prepared if p.boot is not None]
        # The OS image's volume first: firmware boots from the first disk.
        ordered = bootable[:1] + [p for p in prepared if p not in bootable[:1]]
        boot: Boot = bootable[0].boot if bootable and bootable[0].boot else DiskBoot()
        await self._driver.start(
            machine_id, shape, boot, [p.disk for p in ordered],
            [state.nics[n.name] for n in machine.spec.network_interfaces],
            machine.spec.ignition_data, machine.spec.guest_config.hostname)
        self._events.record(machine.metadata, NORMAL, "MachineStarted",
                            f"virtual machine started (pid {self._driver.pid(machine_id)})",
                            "Start")

    async def _prepare_nics(self, machine: iri.Machine, state: _Machine) -> None:
        machine_id = machine.metadata.id
        wanted = {n.name: n for n in machine.spec.network_interfaces}
        for name, nic in wanted.items():
            if name not in state.nics:
                tap = await self._nics.plug(machine_id, name, nic.network_id)
                state.nics[name] = MachineNic(name, tap, self._nics.mac_address(machine_id, name))

    async def _prepare_volumes(self, machine: iri.Machine, state: _Machine) -> None:
        for volume in machine.spec.volumes:
            if volume.name not in state.volumes:
                prepared = await self._volumes.prepare(machine, volume)
                state.volumes[volume.name] = prepared
                state.sizes[volume.name] = prepared.size_bytes

    async def _grow_offline(self, machine: iri.Machine, state: _Machine) -> None:
        """Sizes asked for while the VM was off (or before a daemon restart) are given to the
        disk files before it boots."""
        for volume in machine.spec.volumes:
            size = self._volumes.size_bytes(volume)
            if size > state.sizes.get(volume.name, 0):
                await self._volumes.grow(machine.metadata.id, volume, size)
                state.sizes[volume.name] = size
                self._events.record(machine.metadata, NORMAL, "ResizeVolumeSucceeded",
                                    f"volume {volume.name} grown to {size} bytes",
                                    "UpdateVolume")

    async def _sync_devices(self, machine: iri.Machine, state: _Machine) -> None:
        """Hot-plug to match the spec: detach first (frees ports), then attach, then grow."""
        machine_id = machine.metadata.id
        attached = await self._driver.attached(machine_id)
        wanted_volumes = {v.name: v for v in machine.spec.volumes}
        wanted_nics = {n.name for n in machine.spec.network_interfaces}
        for name, prepared in list(state.volumes.items()):
            if name not in wanted_volumes:
                if device_id(prepared.disk.device) in attached:
                    await self._driver.remove_disk(machine_id, prepared.disk)
                await self._volumes.release(machine_id, name)
                del state.volumes[name]
                state.sizes.pop(name, None)
                self._events.record(machine.metadata, NORMAL, "DetachVolumeSucceeded",
                                    f"volume {name} detached", "DetachVolume")
        for name in list(state.nics):
            if name not in wanted_nics:
                if nic_device_id(name) in attached:
                    await self._driver.remove_nic(machine_id, name)
                await self._unplug_nic(machine, name)
                del state.nics[name]
                self._events.record(machine.metadata, NORMAL, "DetachNICSucceeded",
                                    f"network interface {name} detached", "DetachNIC")
        for name, volume in wanted_volumes.items():
            prepared = state.volumes[name]
            if device_id(prepared.disk.device) not in attached:
                await self._driver.add_disk(machine_id, prepared.disk)
                self._events.record(machine.metadata, NORMAL, "AttachVolumeSucceeded",
                                    f"volume {name} attached as {prepared.disk.device}",
                                    "AttachVolume")
            size = self._volumes.size_bytes(volume)
            if size > state.sizes.get(name, 0):
                await self._driver.resize_disk(machine_id, prepared.disk, size)
                state.sizes[name] = size
                self._events.record(machine.metadata, NORMAL, "ResizeVolumeSucceeded",
                                    f"volume {name} grown to {size} bytes", "UpdateVolume")
        for nic in machine.spec.network_interfaces:
            if nic_device_id(nic.name) not in attached:
                await self._driver.add_nic(machine_id, state.nics[nic.name])
                self._events.record(machine.metadata, NORMAL, "AttachNICSucceeded",
                                    f"network interface {nic.name} attached", "AttachNIC")

    async def _power_off(self, machine: iri.Machine, state: _Machine) -> bool:
        """Press the button until the guest is off or the grace is over, then stop hard.
        True once the VM is gone."""
        machine_id = machine.metadata.id
        if not self._driver.running(machine_id):
            state.stopping_since = None
            return True
        now = time.monotonic()
        deleting = bool(machine.metadata.deleted_at)
        grace = self._settings.delete_grace if deleting else self._settings.power_off_grace
        if state.stopping_since is None:
            state.stopping_since = now
            state.last_button = 0.0
            self._events.record(machine.metadata, NORMAL, "TriggerShutdownSucceeded",
                                "power button pressed", "Shutdown")
        if now - state.stopping_since >= grace:
            log.info("machine did not power off in time, stopping it machine=%s grace=%.0fs",
                     machine_id, grace)
            await self._driver.kill(machine_id)
            state.stopping_since = None
            return True
        if now - state.last_button >= self._settings.button_interval:
            await self._driver.press_power_button(machine_id)
            state.last_button = now
        # Come back when the button is due again or the grace is over (a VM exit comes first).
        self._later(machine_id, min(self._settings.button_interval,
                                    grace - (now - state.stopping_since)))
        return False

    async def _delete(self, machine: iri.Machine, state: _Machine) -> None:
        machine_id = machine.metadata.id
        if not await self._power_off(machine, state):
            await self._report(machine, state)
            return
        for name in {*(n.name for n in machine.spec.network_interfaces), *state.nics}:
            await self._unplug_nic(machine, name)
        for name in {*(v.name for v in machine.spec.volumes), *state.volumes}:
            await self._volumes.release(machine_id, name)
        await self._driver.forget(machine_id)
        await self._store.remove(machine_id)
        self._known.pop(machine_id, None)
        self._events.record(machine.metadata, NORMAL, "MachineDeletionSucceeded",
                            "machine deleted and its resources released", "Delete")
        log.info("machine deleted machine=%s", machine_id)

    async def _unplug_nic(self, machine: iri.Machine, name: str) -> None:
        for nic in machine.spec.network_interfaces:
            if nic.name == name:
                await self._nics.unplug(machine.metadata.id, name, nic.network_id)
                return
        # Detached from the spec already: its network is only known from the tap's bridge.
        await self._nics.unplug_tap(machine.metadata.id, name)

    async def _report(self, machine: iri.Machine, state: _Machine, failed: str = "") -> None:
        machine_id = machine.metadata.id
        running = self._driver.running(machine_id)
        attached = await self._driver.attached(machine_id) if running else set()
        if machine.metadata.deleted_at:
            phase = iri.MACHINE_TERMINATING
        elif running and state.stopping_since is None:
            phase = iri.MACHINE_RUNNING
        elif not running and (machine.spec.power == iri.POWER_OFF
                              or state.guest_off_generation is not None):
            phase = iri.MACHINE_STOPPED
        else:
            phase = iri.MACHINE_PENDING
        settled = not failed and machine_id not in self._dirty and (
            phase in (iri.MACHINE_RUNNING, iri.MACHINE_STOPPED))
        image_ref = next((p.image_ref for p in state.volumes.values() if p.image_ref), "")

        def update(current: iri.Machine) -> None:
            status = current.status
            status.state = phase
            status.image_ref = image_ref or status.image_ref
            del status.volumes[:]
            for volume in current.spec.volumes:
                prepared = state.volumes.get(volume.name)
                on = prepared is not None and device_id(prepared.disk.device) in attached
                status.volumes.add(name=volume.name, handle=prepared.disk.device if prepared
                                   else "", state=iri.VOLUME_ATTACHED if on
                                   else iri.VOLUME_PENDING)
            del status.network_interfaces[:]
            for nic in current.spec.network_interfaces:
                tap = state.nics.get(nic.name)
                on = tap is not None and nic_device_id(nic.name) in attached
                status.network_interfaces.add(
                    name=nic.name, handle=tap.tap if tap else "",
                    state=iri.NETWORK_INTERFACE_ATTACHED if on
                    else iri.NETWORK_INTERFACE_PENDING)
            if settled and current.metadata.generation == machine.metadata.generation:
                status.observed_generation = machine.metadata.generation
            if failed:
                set_condition(status, READY, FALSE, "ReconcileFailed", failed)
            elif phase == iri.MACHINE_RUNNING and settled:
                set_condition(status, READY, TRUE, "Running")
            else:
                reason = iri.MachineState.Name(phase).removeprefix("MACHINE_").capitalize()
                set_condition(status, READY, FALSE, reason)

        await self._store.update_status(machine_id, update)

    # --- timers -------------------------------------------------------------------------------

    def _later(self, machine_id: str, delay: float) -> None:
        old = self._timers.pop(machine_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[machine_id] = loop.call_later(max(0.05, delay), self.changed, machine_id)

    async def _resync_loop(self) -> None:
        """Catch what no event announced (a disk file removed, a tap deleted by hand)."""
        while True:
            await asyncio.sleep(self._settings.resync_interval)
            for machine_id in self._store.ids():
                self.changed(machine_id)
