"""Container root filesystems in the guest: the host's 9p shares (images read-only, volumes
read-write), one loop-mounted EROFS per image file shared by the pod's containers (reference
counted), and a per-container overlay whose upper layer lives on the guest's /run (tmpfs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent import mountutil
from vmagent.api import agent_pb2 as pb
from vmagent.contract import IMAGES_TAG
from vmagent.idmap import IdMaps, idmapped_clone

log = logging.getLogger("vmagent")

_9P_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=none"


class Rootfs:
    """Where a container's root lives; `path` is the overlay runc uses as root.path."""

    def __init__(self, path: str, upper: str, images: list[str]) -> None:
        self.path = path
        self.upper = upper
        self.images = images


class Mounts:
    """Owns every mount the agent makes for containers. One lock: mounts are few and quick, and
    serialising them keeps the reference counts and loop device allocation simple."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.images_dir = os.path.join(run_dir, "images")
        self.shared_dir = os.path.join(run_dir, "shared")
        self._image_mnt_dir = os.path.join(run_dir, "imagefs")
        self._lock = asyncio.Lock()
        self._shares: set[str] = set()
        self._images: dict[str, tuple[str, int]] = {}  # image file -> (mount point, users)
        self._serial = 0

    async def ensure_share(self, tag: str, target: str, read_only: bool) -> None:
        async with self._lock:
            if target in self._shares:
                return
            flags = mountutil.MS_NOSUID | mountutil.MS_NODEV
            flags |= mountutil.MS_RDONLY if read_only else 0

            def work() -> None:
                os.makedirs(target, exist_ok=True)
                if not mountutil.is_mountpoint(target):
                    mountutil.mount(tag, target, "9p", flags, _9P_OPTIONS)

            try:
                await asyncio.to_thread(work)
            except OSError as exc:
                raise GRPCError(Status.FAILED_PRECONDITION,
                                f"cannot mount share {tag} (is it exported to this VM?): "
                                f"{exc.strerror}") from exc
            self._shares.add(target)
            log.info("share mounted tag=%s target=%s ro=%s", tag, target, read_only)

    async def _image_file(self, lower: pb.Mount) -> str:
        if lower.source.startswith("image:"):
            name = lower.source[len("image:"):]
            if not name or "/" in name or name in (".", ".."):
                raise GRPCError(Status.INVALID_ARGUMENT, f"bad image name {lower.source!r}")
            await self.ensure_share(IMAGES_TAG, self.images_dir, read_only=True)
            return os.path.join(self.images_dir, name)
        if lower.source.startswith("/"):
            return lower.source
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"unsupported rootfs layer source {lower.source!r}")

    async def acquire_image(self, lower: pb.Mount,
                            idmap: tuple[IdMaps, str] | None = None) -> tuple[str, str]:
        """Mount point of an image layer (mounted on first use) and its key for release.
        `idmap`: the pod's mappings and its user namespace path; the layer is then an idmapped
        mount, its files owned by the pod's mapped IDs."""
        fstype = lower.type or "erofs"
        path = await self._image_file(lower)
        key = f"{path}|{idmap[0].key()}" if idmap else path
        async with self._lock:
            known = self._images.get(key)
            if known is not None:  # mounted, maybe with no user left (release_image)
                self._images[key] = (known[0], known[1] + 1)
                return known[0], key
            self._serial += 1
            target = os.path.join(self._image_mnt_dir, str(self._serial))

            def plain(to: str) -> str:
                os.makedirs(to, exist_ok=True)
                if os.path.isdir(path):  # an unpacked layer directory: bind it read-only
                    mountutil.mount(path, to, "", mountutil.MS_BIND)
                    return path
                return mountutil.mount_loop(path, to, fstype)

            def work() -> str:
                if idmap is None:
                    return plain(target)
                staging = f"{target}.plain"
                dev = plain(staging)
                try:
                    os.makedirs(target, exist_ok=True)
                    idmapped_clone(staging, target, idmap[1])
                finally:
                    # The clone holds the filesystem (and its loop device) from now on.
                    mountutil.umount(staging, mountutil.MNT_DETACH)
                return dev

            try:
                dev = await asyncio.to_thread(work)
            except FileNotFoundError as exc:
                raise GRPCError(Status.NOT_FOUND, f"image file {path} not found") from exc
            except OSError as exc:
                raise GRPCError(Status.INTERNAL, f"mount image {path}: {exc}") from exc
            self._images[key] = (target, 1)
            log.info("image mounted file=%s target=%s device=%s idmapped=%s", path, target, dev,
                     idmap is not None)
            return target, key

    async def release_image(self, key: str) -> None:
        """One user fewer. The last one's leaving keeps the image mounted: the next container
        of the same image (a restart, most often) starts without mounting it again, and a
        delete does not wait for the unmount (~0.1 s under TCG). The pod's guest is the
        image's only user on this VM, and it ends with the pod."""
        async with self._lock:
            known = self._images.get(key)
            if known is None or known[1] == 0:
                return
            self._images[key] = (known[0], known[1] - 1)
            if known[1] == 1:
                log.info("image unused, kept mounted file=%s target=%s", key, known[0])

    async def unmount_unused(self) -> None:
        """Unmount the images no container uses. A guest never needs to (its mounts end with
        it); an agent run on a host (tests) must leave nothing mounted."""
        async with self._lock:
            for key, (target, users) in list(self._images.items()):
                if users == 0:
                    del self._images[key]
                    # Lazy detach: a straggling reader must not make this fail; the loop
                    # device clears itself once the mount is really gone.
                    await asyncio.to_thread(mountutil.umount, target, mountutil.MNT_DETACH)
                    log.info("image unmounted file=%s target=%s", key, target)

    async def make_rootfs(self, container_id: str, bundle: str, spec: pb.Rootfs,
                          idmap: tuple[IdMaps, str] | None = None) -> Rootfs:
        """Mount the image layers and the container's overlay under `bundle`/rootfs; with
        `idmap` (the pod's user namespace), as the container's mapped root owns it."""
        if not spec.lowers:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"container {container_id}: rootfs has no image layer")
        if spec.HasField("upper"):
            raise GRPCError(Status.UNIMPLEMENTED,
                            f"container {container_id}: only a tmpfs upper layer is supported")
        lowers: list[str] = []
        keys: list[str] = []
        try:
            for lower in spec.lowers:
                target, key = await self.acquire_image(lower, idmap)
                lowers.append(target)
                keys.append(key)
            rootfs = os.path.join(bundle, "rootfs")
            upper = os.path.join(bundle, "upper")
            work = os.path.join(bundle, "work")
            # overlayfs lists lowerdirs top first; the proto lists them bottom first.
            options = (f"lowerdir={':'.join(reversed(lowers))},upperdir={upper},"
                       f"workdir={work},index=off")

            def mount_overlay() -> None:
                for d in (rootfs, upper, work):
                    os.makedirs(d, exist_ok=True)
                if idmap is not None:
                    # The upper dir is the overlay's root directory: the container's root
                    # owns it, as it owns the idmapped layers (tmpfs is not idmapped in 6.1).
                    os.chown(upper, *idmap[0].root())
                mountutil.mount("overlay", rootfs, "overlay", 0, options)

            await asyncio.to_thread(mount_overlay)
        except BaseException:
            for key in keys:
                await self.release_image(key)
            raise
        return Rootfs(rootfs, upper, keys)

    async def remove_rootfs(self, rootfs: Rootfs) -> None:
        await asyncio.to_thread(mountutil.umount, rootfs.path, mountutil.MNT_DETACH)
        for key in rootfs.images:
            await self.release_image(key)
        rootfs.images = []


async def remove_tree(path: str) -> None:
    await asyncio.to_thread(shutil.rmtree, path, True)


def dir_bytes(path: str) -> int:
    """Bytes used by the files under `path` (the writable layer). Blocking: use a thread."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def executable_in_rootfs(rootfs: str, process: dict[str, Any]) -> str | None:
    """The guest path of the file a container's process will exec (args[0], looked up in its
    PATH as the runtime does), or None. A link that leads out of the rootfs gives None."""
    args = process.get("args") or []
    if not args or not args[0]:
        return None
    name = str(args[0])
    if "/" in name:
        candidates = [os.path.join(str(process.get("cwd") or "/"), name)]
    else:
        env = dict(str(e).split("=", 1) for e in process.get("env") or [] if "=" in str(e))
        candidates = [os.path.join(d, name) for d in env.get("PATH", _DEFAULT_PATH).split(":")
                      if d.startswith("/")]
    root = os.path.realpath(rootfs)
    for candidate in candidates:
        path = os.path.realpath(root + os.path.normpath(candidate))
        if os.path.commonpath([root, path]) == root and os.path.isfile(path):
            return path
    return None


READ_AHEAD_CHUNK = 256 * 1024
READ_AHEAD_MAX = 16 * 1024 * 1024  # of a huge executable, its start; the rest as it faults


def read_ahead(path: str, stop: threading.Event) -> None:
    """Read `path` (at most READ_AHEAD_MAX of it) into the page cache chunk by chunk until
    done or `stop` is set. Only a
    hint: errors end it. An image's files come through its loop device and 9p share, page
    fault by page fault when a process maps them, each dear under TCG; read ahead while the
    guest is otherwise idle, they are there when the process starts. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        size = min(os.fstat(fd).st_size, READ_AHEAD_MAX)
        for offset in range(0, size, READ_AHEAD_CHUNK):
            if stop.is_set():
                return
            end = min(offset + READ_AHEAD_CHUNK, size)
            os.posix_fadvise(fd, offset, end - offset, os.POSIX_FADV_WILLNEED)
            os.pread(fd, 1, end - 1)  # waits for the chunk's last page: then check `stop`
    except OSError:
        pass
    finally:
        os.close(fd)
