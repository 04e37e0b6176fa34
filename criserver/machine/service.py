"""The MachineRuntime calls: check the request, record desired state, tell the reconciler.

No call here touches a VM. Each one validates, writes the machine store (metadata and spec; the
status only at creation, PENDING, and when deletion is asked, TERMINATING) and returns; the
reconciler (seams.Reconciler) does the work and reports status. Behaviour follows the reference
providers (../shared/reference/iri/SEMANTICS.md); docs/design/machine-runtime.md has the rules.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from criserver import __version__
from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.config import MachineConfig
from criserver.errors import FailedPrecondition, InvalidArgument, NotFound
from criserver.machine import validation
from criserver.machine.classes import HostCapacity, MachineClasses, host_capacity
from criserver.machine.events import EventStore, labels_match
from criserver.machine.seams import ExecConsole, Reconciler
from criserver.machine.store import MachineStore

RUNTIME_NAME = "criserver"
# As the reference: 63 hex digits fit a Kubernetes label value.
ID_LENGTH = 63


def new_machine_id() -> str:
    while True:
        machine_id = secrets.token_hex(32)[:ID_LENGTH]
        # A short prefix of the id (as tools print it) must not read as a number.
        if not machine_id[:12].isdigit():
            return machine_id


class MachineService:
    def __init__(self, store: MachineStore, events: EventStore, classes: MachineClasses,
                 reconciler: Reconciler, console: ExecConsole, settings: MachineConfig,
                 host: Callable[[], HostCapacity] = host_capacity) -> None:
        self.store = store
        self.events = events
        self.classes = classes
        self.reconciler = reconciler
        self.console = console
        self.settings = settings
        self._host = host

    # ---- Read-only calls ------------------------------------------------------------------

    async def version(self, request: iri.VersionRequest) -> iri.VersionResponse:
        return iri.VersionResponse(runtime_name=RUNTIME_NAME, runtime_version=__version__)

    async def status(self, request: iri.StatusRequest) -> iri.StatusResponse:
        return iri.StatusResponse(machine_class_status=self.classes.status(self._host()))

    async def list_events(self, request: iri.ListEventsRequest) -> iri.ListEventsResponse:
        return iri.ListEventsResponse(events=self.events.list(request.filter))

    async def list_machines(self, request: iri.ListMachinesRequest) -> iri.ListMachinesResponse:
        f = request.filter
        if f.id:
            # An id that matches nothing is an empty list, never NotFound.
            found = self.store.get(f.id)
            candidates = [found] if found is not None else []
        else:
            candidates = self.store.list()
        machines = [m for m in candidates if labels_match(f.label_selector, m.metadata.labels)]
        return iri.ListMachinesResponse(machines=machines)

    # ---- Machines -------------------------------------------------------------------------

    async def create_machine(self, request: iri.CreateMachineRequest) -> iri.CreateMachineResponse:
        if not request.HasField("machine"):
            raise InvalidArgument("machine is required")
        asked = request.machine
        class_name = getattr(asked.spec, "class")
        validation.require(class_name, "machine.spec.class")
        if self.classes.get(class_name) is None:
            raise InvalidArgument(f"machine class {class_name!r} is not offered by this node "
                                  f"(offered: {', '.join(self.classes.names()) or 'none'})")
        validation.check_spec(asked.spec, self.settings)

        machine = iri.Machine()
        # Only labels and annotations are taken from the request's metadata; the id is ours.
        machine.metadata.labels.update(asked.metadata.labels)
        machine.metadata.annotations.update(asked.metadata.annotations)
        machine.metadata.id = new_machine_id()
        machine.metadata.created_at = time.time_ns()
        # Starts at 1 so that observed_generation 0 reads as "not seen yet".
        machine.metadata.generation = 1
        machine.spec.CopyFrom(asked.spec)
        machine.status.state = iri.MACHINE_PENDING
        stored = await self.store.add(machine)
        self.reconciler.changed(stored.metadata.id)
        return iri.CreateMachineResponse(machine=stored)

    async def delete_machine(self, request: iri.DeleteMachineRequest) -> iri.DeleteMachineResponse:
        validation.require(request.machine_id, "machine_id")
        machine = self.store.require(request.machine_id)
        if not machine.metadata.deleted_at:
            # Asynchronous: the machine stays listed, TERMINATING, until the reconciler has
            # released what it holds and removed it. A second Delete meanwhile is OK.
            await self.store.update(request.machine_id, _mark_deleted, status=_terminating)
        self.reconciler.changed(request.machine_id)
        return iri.DeleteMachineResponse()

    async def update_machine_annotations(
        self, request: iri.UpdateMachineAnnotationsRequest
    ) -> iri.UpdateMachineAnnotationsResponse:
        validation.require(request.machine_id, "machine_id")

        def replace(machine: iri.Machine) -> None:
            machine.metadata.ClearField("annotations")
            machine.metadata.annotations.update(request.annotations)

        await self.store.update(request.machine_id, replace)
        return iri.UpdateMachineAnnotationsResponse()

    async def update_machine_power(
        self, request: iri.UpdateMachinePowerRequest
    ) -> iri.UpdateMachinePowerResponse:
        validation.check_power(request.power)

        def power(machine: iri.Machine) -> None:
            machine.spec.power = request.power

        await self._change_spec(request.machine_id, power)
        return iri.UpdateMachinePowerResponse()

    # ---- Volumes --------------------------------------------------------------------------

    async def attach_volume(self, request: iri.AttachVolumeRequest) -> iri.AttachVolumeResponse:
        if not request.HasField("volume"):
            raise InvalidArgument("volume is required")
        validation.check_volume(request.volume, self.settings)

        def attach(machine: iri.Machine) -> None:
            validation.check_volume_fits(request.volume, list(machine.spec.volumes))
            machine.spec.volumes.append(request.volume)

        await self._change_spec(request.machine_id, attach)
        return iri.AttachVolumeResponse()

    async def detach_volume(self, request: iri.DetachVolumeRequest) -> iri.DetachVolumeResponse:
        validation.require(request.name, "name")

        def detach(machine: iri.Machine) -> None:
            index = _index_of(machine.spec.volumes, request.name, "volume", machine)
            del machine.spec.volumes[index]

        await self._change_spec(request.machine_id, detach)
        return iri.DetachVolumeResponse()

    async def update_volume(self, request: iri.UpdateVolumeRequest) -> iri.UpdateVolumeResponse:
        if not request.HasField("volume"):
            raise InvalidArgument("volume is required")
        validation.check_volume(request.volume, self.settings)

        def update(machine: iri.Machine) -> None:
            index = _index_of(machine.spec.volumes, request.volume.name, "volume", machine)
            validation.check_volume_update(machine.spec.volumes[index], request.volume)
            machine.spec.volumes[index].CopyFrom(request.volume)

        await self._change_spec(request.machine_id, update)
        return iri.UpdateVolumeResponse()

    # ---- Network interfaces ---------------------------------------------------------------

    async def attach_network_interface(
        self, request: iri.AttachNetworkInterfaceRequest
    ) -> iri.AttachNetworkInterfaceResponse:
        if not request.HasField("network_interface"):
            raise InvalidArgument("network_interface is required")
        validation.check_nic(request.network_interface)

        def attach(machine: iri.Machine) -> None:
            validation.check_nic_fits(request.network_interface,
                                      list(machine.spec.network_interfaces))
            machine.spec.network_interfaces.append(request.network_interface)

        await self._change_spec(request.machine_id, attach)
        return iri.AttachNetworkInterfaceResponse()

    async def detach_network_interface(
        self, request: iri.DetachNetworkInterfaceRequest
    ) -> iri.DetachNetworkInterfaceResponse:
        validation.require(request.name, "name")

        def detach(machine: iri.Machine) -> None:
            nics = machine.spec.network_interfaces
            del nics[_index_of(nics, request.name, "network interface", machine)]

        await self._change_spec(request.machine_id, detach)
        return iri.DetachNetworkInterfaceResponse()

    # ---- Console --------------------------------------------------------------------------

    async def exec(self, request: iri.ExecRequest) -> iri.ExecResponse:
        validation.require(request.machine_id, "machine_id")
        _refuse_deleting(self.store.require(request.machine_id))
        url = await self.console.exec_url(request.machine_id, request)
        return iri.ExecResponse(url=url)

    # ---- Helpers --------------------------------------------------------------------------

    async def _change_spec(self, machine_id: str, change: Callable[[iri.Machine], None]) -> None:
        """Apply `change` to the machine's spec (it may raise to refuse), then wake the
        reconciler. A machine being deleted takes no more changes."""
        validation.require(machine_id, "machine_id")

        def checked(machine: iri.Machine) -> None:
            _refuse_deleting(machine)
            change(machine)

        await self.store.update(machine_id, checked)
        self.reconciler.changed(machine_id)


def _refuse_deleting(machine: iri.Machine) -> None:
    if machine.metadata.deleted_at:
        raise FailedPrecondition(f"machine {machine.metadata.id} is being deleted")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def _index_of(items: Iterable[_Named], name: str, what: str, machine: iri.Machine) -> int:
    for index, item in enumerate(items):
        if item.name == name:
            return index
    raise NotFound(f"machine {machine.metadata.id}: {what} {name} not found")


def _mark_deleted(machine: iri.Machine) -> None:
    machine.metadata.deleted_at = time.time_ns()


def _terminating(status: iri.MachineStatus) -> None:
    status.state = iri.MACHINE_TERMINATING
