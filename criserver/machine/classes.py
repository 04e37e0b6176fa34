"""Machine classes: the shapes (vCPUs, memory) this host offers, from the [machine] config.

The machinepoollet matches a class by name and by an exactly equal resources map, so the map
holds just "cpu" (whole cores) and "memory" (bytes). Status reports each class with how many
machines of it fit the host: min(host cores // cpu, host memory // memory), as the reference does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.config import MachineClassConfig
from criserver.machine.driver import Shape

CPU = "cpu"
MEMORY = "memory"
MIB = 1024**2


@dataclass(frozen=True)
class HostCapacity:
    cores: int
    memory_bytes: int


def host_capacity() -> HostCapacity:
    """This host's online CPUs and physical memory (sysconf: no file read, no blocking)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HostCapacity(cores=os.cpu_count() or 1, memory_bytes=memory)


class MachineClasses:
    def __init__(self, classes: Iterable[MachineClassConfig]) -> None:
        self._classes = {c.name: c for c in classes}

    def get(self, name: str) -> MachineClassConfig | None:
        return self._classes.get(name)

    def names(self) -> list[str]:
        return list(self._classes)

    def shape(self, class_name: str) -> Shape | None:
        """The VM shape of a class (the reconciler's Classes seam), None if not offered."""
        machine_class = self._classes.get(class_name)
        if machine_class is None:
            return None
        return Shape(vcpus=machine_class.cpu, memory_mib=machine_class.memory_bytes // MIB)

    def status(self, host: HostCapacity) -> list[iri.MachineClassStatus]:
        return [
            iri.MachineClassStatus(machine_class=to_proto(c), quantity=quantity(c, host))
            for c in self._classes.values()
        ]


def to_proto(machine_class: MachineClassConfig) -> iri.MachineClass:
    return iri.MachineClass(
        name=machine_class.name,
        capabilities=iri.MachineClassCapabilities(
            resources={CPU: machine_class.cpu, MEMORY: machine_class.memory_bytes}),
    )


def quantity(machine_class: MachineClassConfig, host: HostCapacity) -> int:
    return min(host.cores // machine_class.cpu, host.memory_bytes // machine_class.memory_bytes)
