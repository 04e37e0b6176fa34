"""Machine volumes as disk files: what the reconciler's `Volumes` Protocol asks for.

A `local_disk` is a qcow2 file the machine owns, `size_bytes` large: empty, or copy-on-write
over a read-only base made once per OS image from the image's disk.img. The OS image is pulled
through the daemon's image service (mirrors, auth, one pull for many machines) and held in use
by `<machine id>/<volume name>` until the volume is released, so no image removal pulls a base
from under a machine. An image with a kernel boots it directly with the image's command line
(seconds faster than firmware under emulation); one without boots its disk through firmware.

A `connection` volume is a disk someone else made (the volume provider): driver `file`, its
handle the absolute path of a regular file or block device below one of the configured
`connection_dirs` (validation.check_connection), used raw. Its size is the provider's
business; growing it here only tells QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
from pathlib import Path

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.errors import InvalidArgument, NotFound
from criserver.image.osboot import OsImage
from criserver.image.service import ImageService
from criserver.machine.driver import Boot, DiskBoot, KernelBoot, MachineDisk
from criserver.machine.reconciler import NORMAL, EventRecorder, PreparedVolume
from criserver.machine.validation import check_connection
from criserver.vm import disks

log = logging.getLogger(__name__)

def image_user(machine_id: str, volume_name: str) -> str:
    """Who holds an OS image in use, as the image service records it."""
    return f"{machine_id}/{volume_name}"


class MachineVolumes:
    def __init__(self, images: ImageService, events: EventRecorder, disks_dir: Path,
                 bases_dir: Path, connection_dirs: list[str]) -> None:
        self._images = images
        self._events = events
        self._disks_dir = disks_dir
        self._bases = disks.Bases(bases_dir)
        self._connection_dirs = connection_dirs

    def disk_path(self, machine_id: str, volume_name: str) -> Path:
        # Volume names are the client's strings: a digest makes them a safe file name.
        digest = hashlib.sha256(volume_name.encode()).hexdigest()[:16]
        return self._disks_dir / machine_id / f"{digest}.qcow2"

    def size_bytes(self, volume: iri.Volume) -> int:
        if volume.HasField("connection"):
            return volume.connection.effective_storage_bytes
        return volume.local_disk.size_bytes

    async def prepare(self, machine: iri.Machine, volume: iri.Volume) -> PreparedVolume:
        """The volume's disk, made if missing (idempotent: a retry or a restarted daemon finds
        the file made before).

        :raises InvalidArgument: a bad connection, or an image that cannot make a disk.
        :raises NotFound: the connection's file, or the image, does not exist.
        """
        if volume.HasField("connection"):
            return await self._prepare_connection(volume)
        machine_id = machine.metadata.id
        path = self.disk_path(machine_id, volume.name)
        if not volume.local_disk.image.image:
            # (validation.check_volume made sure such a disk has a size)
            made = await disks.create(path, volume.local_disk.size_bytes)
            return PreparedVolume(MachineDisk(volume.device, path), size_bytes=made.virtual_size)
        image = await self._pull(machine, volume)
        boot: Boot
        if image.kernel is not None:
            boot = KernelBoot(image.kernel, image.initramfs, image.command_line)
        elif image.disk is not None:
            boot = DiskBoot()
        else:
            raise InvalidArgument(f"volume {volume.name}: image {image.ref} has neither a "
                                  f"kernel nor a disk.img to boot")
        base = None
        if image.disk is not None:
            base = await self._bases.ensure(image.id.partition(":")[2], image.disk)
        size = volume.local_disk.size_bytes or (base.virtual_size if base else 0)
        if size <= 0:
            raise InvalidArgument(f"volume {volume.name}: image {image.ref} has no disk.img, "
                                  f"so the local_disk needs size_bytes")
        made = await disks.create(path, size, base)
        return PreparedVolume(MachineDisk(volume.device, path), image.image_ref, boot,
                              size_bytes=made.virtual_size)

    async def _pull(self, machine: iri.Machine, volume: iri.Volume) -> OsImage:
        name = volume.local_disk.image.image
        user = image_user(machine.metadata.id, volume.name)
        local = self._images.get_os_image(name)
        if local is not None and user in self._images.os_image_users(local.id):
            # Ours already (an earlier pass or daemon): no registry call, no new events.
            return local
        self._events.record(machine.metadata, NORMAL, "PullingImage",
                            f"pulling image {name}", "PullImage")
        image = await self._images.pull_os_image(name, user=user)
        self._events.record(machine.metadata, NORMAL, "ImagePullSucceeded",
                            f"pulled image {name} ({image.image_ref})", "PullImage")
        return image

    async def _prepare_connection(self, volume: iri.Volume) -> PreparedVolume:
        path = check_connection(volume.connection, self._connection_dirs)
        try:
            mode = (await asyncio.to_thread(os.stat, path)).st_mode
        except FileNotFoundError:
            raise NotFound(f"volume {volume.name}: {path} does not exist") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise InvalidArgument(f"volume {volume.name}: {path} is neither a regular file "
                                  f"nor a block device")
        return PreparedVolume(MachineDisk(volume.device, path, format="raw"),
                              size_bytes=volume.connection.effective_storage_bytes)

    async def grow(self, machine_id: str, volume: iri.Volume, size_bytes: int) -> None:
        """Grow the disk file of a machine whose VM is off (a running one grows over QMP).

        :raises FailedPrecondition: a VM holds the disk after all.
        """
        if volume.HasField("connection"):
            return  # the volume provider sized it; QEMU reads the size when it opens it
        await disks.resize(self.disk_path(machine_id, volume.name), size_bytes)

    async def release(self, machine_id: str, volume_name: str) -> None:
        """The volume is detached or its machine deleted: drop a local disk and let go of its
        OS image (and of the image's base once no disk is over it). Idempotent."""
        await disks.remove(self.disk_path(machine_id, volume_name))
        user = image_user(machine_id, volume_name)
        released = False
        for record in self._images.os_images():
            if user in self._images.os_image_users(record.id):
                await self._images.release_os_image(record.id, user)
                released = True
        if released:
            await self.prune()
        await asyncio.to_thread(_rmdir_if_empty, self._disks_dir / machine_id)

    async def prune(self) -> None:
        """Remove the bases no disk is over and whose OS image is gone."""
        disk_files = await asyncio.to_thread(
            lambda: list(self._disks_dir.glob("*/*.qcow2")))
        keep = [r.id.partition(":")[2] for r in self._images.os_images()]
        try:
            await self._bases.prune(disk_files, keep)
        except OSError as exc:
            log.warning("disk bases not pruned: %s", exc)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # missing, or other volumes of the machine are left
        path.rmdir()
