"""The MachineRuntime table: each IRI call handed to its MachineService method."""

from __future__ import annotations

from typing import Any

from criserver.machine.service import MachineService

# Why each unimplemented call is: the caller sees this in the UNIMPLEMENTED status.
MISSING: dict[str, str] = {}


def machine_runtime_service(service: MachineService) -> dict[str, Any]:
    return {
        "Version": service.version,
        "ListEvents": service.list_events,
        "ListMachines": service.list_machines,
        "CreateMachine": service.create_machine,
        "DeleteMachine": service.delete_machine,
        "UpdateMachineAnnotations": service.update_machine_annotations,
        "UpdateMachinePower": service.update_machine_power,
        "AttachVolume": service.attach_volume,
        "DetachVolume": service.detach_volume,
        "UpdateVolume": service.update_volume,
        "AttachNetworkInterface": service.attach_network_interface,
        "DetachNetworkInterface": service.detach_network_interface,
        "Status": service.status,
        "Exec": service.exec,
    }
