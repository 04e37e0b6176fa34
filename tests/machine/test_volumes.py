"""Machine volumes as files: the test OS image pulled from a real registry into a copy-on-write
root disk over its base, empty disks, host-file connections, offline growth, and release (the
image let go, the base pruned once its image is gone)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.api.iri.meta.v1alpha1 import api_pb2 as meta
from criserver.errors import InvalidArgument, NotFound
from criserver.image import ImageService
from criserver.machine.driver import DiskBoot, KernelBoot
from criserver.machine.volumes import MachineVolumes
from criserver.vm import disks
from tests.machine import os_image
from tests.machine.test_os_image import files, images, push  # noqa: F401 - fixtures
from tests.registry import Registry

MiB = 1 << 20


@dataclass
class Events:
    seen: list[tuple[str, str]] = field(default_factory=list)

    def record(self, metadata: meta.ObjectMetadata, type: str, reason: str, message: str,
               action: str) -> None:
        self.seen.append((metadata.id, reason))


@dataclass
class Env:
    volumes: MachineVolumes
    images: ImageService
    events: Events
    root: Path
    connections: Path


@pytest.fixture
async def env(images: ImageService, tmp_path: Path) -> AsyncIterator[Env]:  # noqa: F811
    connections = tmp_path / "connections"
    connections.mkdir()
    events = Events()
    volumes = MachineVolumes(images, events, tmp_path / "disks", tmp_path / "bases",
                             [str(connections)])
    yield Env(volumes, images, events, tmp_path, connections)


def machine(machine_id: str = "m1") -> iri.Machine:
    return iri.Machine(metadata=meta.ObjectMetadata(id=machine_id))


def local_disk(name: str, device: str, size: int, image: str = "") -> iri.Volume:
    volume = iri.Volume(name=name, device=device, local_disk=iri.LocalDisk(size_bytes=size))
    if image:
        volume.local_disk.image.image = image
    return volume


async def test_an_image_volume_is_a_disk_over_the_images_base(
        env: Env, registry: Registry, files: os_image.OsImageFiles) -> None:  # noqa: F811
    digest = await push(registry, files, "iri/vol-os")
    ref = f"{registry.host}/iri/vol-os:v1"
    root = local_disk("root", "oda", 64 * MiB, ref)
    prepared = await env.volumes.prepare(machine(), root)

    assert prepared.image_ref == f"{registry.host}/iri/vol-os@{digest}"
    assert isinstance(prepared.boot, KernelBoot)
    assert prepared.boot.cmdline == os_image.COMMAND_LINE
    assert prepared.disk.device == "oda" and prepared.disk.format == "qcow2"
    assert prepared.size_bytes == 64 * MiB
    made = await disks.inspect(prepared.disk.path)
    assert made.virtual_size == 64 * MiB
    assert Path(made.backing).read_bytes() == files.disk.read_bytes()
    assert env.events.seen == [("m1", "PullingImage"), ("m1", "ImagePullSucceeded")]
    assert env.images.os_image_users(digest) == ["m1/root"]

    # Again (a retried pass, a restarted daemon): the same file, no pull, no events.
    again = await env.volumes.prepare(machine(), root)
    assert again.disk.path == prepared.disk.path and len(env.events.seen) == 2

    # No size: the image's own. A second machine shares the base.
    other = await env.volumes.prepare(machine("m2"), local_disk("root", "oda", 0, ref))
    assert other.size_bytes == files.disk.stat().st_size
    assert (await disks.inspect(other.disk.path)).backing == made.backing

    await env.volumes.release("m1", "root")
    assert not prepared.disk.path.exists() and not prepared.disk.path.parent.exists()
    assert env.images.os_image_users(digest) == ["m2/root"]
    await env.volumes.release("m2", "root")
    assert Path(made.backing).exists()  # the image is still here: the next machine may want it
    await env.images.remove_os_image(ref)
    await env.volumes.prune()
    assert not Path(made.backing).exists()


async def test_a_disk_only_image_boots_through_firmware(
        env: Env, registry: Registry, files: os_image.OsImageFiles) -> None:  # noqa: F811
    await push(registry, files, "iri/vol-disk-os", disk_only=True)
    prepared = await env.volumes.prepare(machine(), local_disk(
        "root", "oda", 0, f"{registry.host}/iri/vol-disk-os:v1"))
    assert isinstance(prepared.boot, DiskBoot)


async def test_an_empty_disk_grows_while_off(env: Env) -> None:
    data = local_disk("data", "odb", 8 * MiB)
    prepared = await env.volumes.prepare(machine(), data)
    assert prepared.boot is None and prepared.image_ref == "" and prepared.size_bytes == 8 * MiB
    assert (await disks.inspect(prepared.disk.path)).backing == ""
    await env.volumes.grow("m1", data, 16 * MiB)
    assert (await disks.inspect(prepared.disk.path)).virtual_size == 16 * MiB
    assert env.events.seen == []
    await env.volumes.release("m1", "data")
    assert not prepared.disk.path.exists()
    await env.volumes.release("m1", "data")  # idempotent


async def test_volume_names_never_reach_outside_the_machines_directory(env: Env) -> None:
    prepared = await env.volumes.prepare(machine(), local_disk("../../etc/x", "odb", MiB))
    assert prepared.disk.path.parent == env.root / "disks" / "m1"


async def test_an_image_that_is_not_there_is_not_found(env: Env, registry: Registry) -> None:
    with pytest.raises(NotFound):
        await env.volumes.prepare(machine(), local_disk(
            "root", "oda", MiB, f"{registry.host}/iri/nothing:v1"))
    assert not (env.root / "disks" / "m1").exists()


async def test_connections_are_host_files_or_block_devices_used_raw(env: Env) -> None:
    path = env.connections / "vol1"
    path.write_bytes(b"\0" * MiB)
    volume = iri.Volume(name="c", device="odc", connection=iri.VolumeConnection(
        driver="file", handle=str(path), effective_storage_bytes=MiB))
    prepared = await env.volumes.prepare(machine(), volume)
    assert prepared.disk.path == path and prepared.disk.format == "raw"
    assert prepared.size_bytes == MiB
    await env.volumes.grow("m1", volume, 2 * MiB)  # the provider's business: untouched
    assert path.stat().st_size == MiB
    await env.volumes.release("m1", "c")
    assert path.exists()  # not ours to delete

    volume.connection.handle = str(env.connections / "missing")
    with pytest.raises(NotFound, match="does not exist"):
        await env.volumes.prepare(machine(), volume)
    os.mkfifo(env.connections / "fifo")
    volume.connection.handle = str(env.connections / "fifo")
    with pytest.raises(InvalidArgument, match="neither a regular file nor a block device"):
        await env.volumes.prepare(machine(), volume)
    volume.connection.handle = "/etc/passwd"
    with pytest.raises(InvalidArgument, match="outside the directories"):
        await env.volumes.prepare(machine(), volume)
