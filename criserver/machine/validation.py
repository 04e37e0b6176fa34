"""Checks of what a MachineRuntime client asks for, before anything is stored.

Bad input is refused with InvalidArgument and a message naming the field, so nothing half-made
is ever stored for the reconciler to trip over later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.config import MachineConfig
from criserver.errors import AlreadyExists, InvalidArgument
from criserver.image import reference

# Guest-visible disk slots: "oda".."odz", then "odaa".."odzz" (as the reference providers name
# them; each maps to one virtio disk).
DEVICE = re.compile(r"od[a-z]{1,2}")
# The one connection driver this runtime speaks: a host file or block device, used raw.
FILE_DRIVER = "file"


def require(value: str, what: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} is required")


def check_connection(connection: iri.VolumeConnection, allowed: list[str]) -> Path:
    """The host path a `connection` volume names.

    :raises InvalidArgument: another driver, a relative path, `..`, or a path outside the
        `allowed` directories (machine.connection_dirs): a client must not hand a machine any
        file of the host.
    """
    if connection.driver != FILE_DRIVER:
        raise InvalidArgument(f"connection.driver {connection.driver!r} is not supported "
                              f"(only {FILE_DRIVER!r}: a host file or block device)")
    handle = connection.handle
    if not handle.startswith("/") or ".." in handle.split("/"):
        raise InvalidArgument(f"connection.handle {handle!r} is not an absolute path "
                              f"without '..'")
    path = Path(os.path.normpath(handle))
    if not any(path.is_relative_to(d) and path != Path(d) for d in allowed):
        raise InvalidArgument(f"connection.handle {handle!r} is outside the directories this "
                              f"node allows (machine.connection_dirs: {', '.join(allowed)})")
    return path


def check_volume(volume: iri.Volume, settings: MachineConfig) -> None:
    """:raises InvalidArgument: no name, a bad device, not exactly one source, a bad size, a
    connection this node does not serve."""
    require(volume.name, "volume.name")
    where = f"volume {volume.name}"
    if not DEVICE.fullmatch(volume.device):
        raise InvalidArgument(f"{where}: device {volume.device!r} is not a device name "
                              f"(oda..odz, odaa..odzz)")
    has_disk, has_connection = volume.HasField("local_disk"), volume.HasField("connection")
    if has_disk == has_connection:
        raise InvalidArgument(f"{where}: exactly one of local_disk and connection must be set")
    if has_disk:
        size = volume.local_disk.size_bytes
        if size < 0:
            raise InvalidArgument(f"{where}: local_disk.size_bytes {size} is negative")
        if size > settings.max_local_disk_bytes:
            raise InvalidArgument(
                f"{where}: local_disk.size_bytes {size} is larger than this node allows "
                f"({settings.max_local_disk_bytes} bytes, machine.max_local_disk_bytes)")
        if size == 0 and not volume.local_disk.image.image:
            raise InvalidArgument(f"{where}: a local_disk without an image needs size_bytes")
        if volume.local_disk.image.image:
            # A malformed name is refused now; one that names nothing is found out by the pull.
            try:
                reference.parse(volume.local_disk.image.image)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: local_disk.image: {exc.message}") from None
    else:
        require(volume.connection.driver, f"{where}: connection.driver")
        require(volume.connection.handle, f"{where}: connection.handle")
        if volume.connection.effective_storage_bytes < 0:
            raise InvalidArgument(f"{where}: connection.effective_storage_bytes is negative")
        try:
            check_connection(volume.connection, settings.connection_dirs)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}") from None


def check_volume_fits(volume: iri.Volume, volumes: list[iri.Volume]) -> None:
    """A new volume beside the machine's `volumes`.

    :raises AlreadyExists: its name or its device is taken.
    """
    for other in volumes:
        if other.name == volume.name:
            raise AlreadyExists(f"volume {volume.name} is already attached")
        if other.device == volume.device:
            raise AlreadyExists(f"volume {volume.name}: device {volume.device} is already used "
                                f"by volume {other.name}")


def check_volume_update(old: iri.Volume, new: iri.Volume) -> None:
    """What UpdateVolume may change: a connection's details or a size, upwards.

    :raises InvalidArgument: the device or the kind of volume changed, or a size shrank.
    """
    where = f"volume {new.name}"
    if new.device != old.device:
        raise InvalidArgument(f"{where}: the device cannot change ({old.device} -> {new.device})"
                              f"; detach and attach instead")
    if new.HasField("local_disk") != old.HasField("local_disk"):
        raise InvalidArgument(f"{where}: a local disk cannot become a connection or the "
                              f"reverse; detach and attach instead")
    if new.HasField("local_disk"):
        if new.local_disk.image.image != old.local_disk.image.image:
            raise InvalidArgument(f"{where}: the image of a local disk cannot change")
        old_size, new_size = old.local_disk.size_bytes, new.local_disk.size_bytes
    else:
        old_size = old.connection.effective_storage_bytes
        new_size = new.connection.effective_storage_bytes
    if new_size < old_size:
        raise InvalidArgument(f"{where}: disks only grow ({old_size} -> {new_size} bytes)")


def check_nic(nic: iri.NetworkInterface) -> None:
    """:raises InvalidArgument: no name or no network."""
    require(nic.name, "network_interface.name")
    require(nic.network_id, f"network interface {nic.name}: network_id")


def check_nic_fits(nic: iri.NetworkInterface, nics: list[iri.NetworkInterface]) -> None:
    """:raises AlreadyExists: a NIC of this name is attached."""
    if any(other.name == nic.name for other in nics):
        raise AlreadyExists(f"network interface {nic.name} is already attached")


def check_power(power: int) -> None:
    """:raises InvalidArgument: a power state the proto does not define (proto3 enums are open:
    any number arrives, and the reconciler would read it as off)."""
    if power not in iri.Power.values():
        raise InvalidArgument(f"power {power} is not one of "
                              f"{', '.join(f'{n} ({v})' for n, v in iri.Power.items())}")


def check_spec(spec: iri.MachineSpec, settings: MachineConfig) -> None:
    """A whole new machine's power, volumes and NICs, each alone and beside the others."""
    check_power(spec.power)
    volumes: list[iri.Volume] = []
    for volume in spec.volumes:
        check_volume(volume, settings)
        try:
            check_volume_fits(volume, volumes)
        except AlreadyExists as exc:
            raise InvalidArgument(exc.message) from None
        volumes.append(volume)
    nics: list[iri.NetworkInterface] = []
    for nic in spec.network_interfaces:
        check_nic(nic)
        try:
            check_nic_fits(nic, nics)
        except AlreadyExists as exc:
            raise InvalidArgument(exc.message) from None
        nics.append(nic)
