"""Container root filesystems on the host: one read-only mount per image EROFS file, shared by
every container of that image (reference counted), and one overlay per container whose upper and
work dirs live on disk. The mounts directories are shared mounts so that our unmounts reach
mount namespaces copied meanwhile (a private copy would pin the overlay and the loop device).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from criserver import spawn
from criserver.errors import FailedPrecondition, Internal, InvalidArgument
from criserver.network.netns import _prepare_dir
from vmagent import mountutil
from vmagent.rootfs import dir_bytes
from vmagent.rootfs import remove_tree as _remove_tree

log = logging.getLogger(__name__)

MOUNT = "mount"
# mount(2) errors meaning "this kernel cannot mount an EROFS regular file": 6.1 wants a block
# device (ENOTBLK); EINVAL also covers a kernel built without file-backed mounts.
_NEEDS_LOOP = (errno.ENOTBLK, errno.EINVAL)
_MAX_STACKED = 8  # unmount at most this many mounts stacked on one directory

_shared: set[Path] = set()
_shared_lock = threading.Lock()  # taken in worker threads: two first users must not stack binds


def _share_blocking(directory: Path) -> None:
    with _shared_lock:
        if directory not in _shared:
            _prepare_dir(directory)
            _shared.add(directory)


async def share_directory(directory: Path) -> None:
    """Make `directory` (created if missing) a shared bind mount of itself, once per process;
    a daemon restart finds it mounted already and only marks it shared again.

    :raises Internal: the bind or the propagation change failed.
    """
    if directory in _shared:
        return
    try:
        await asyncio.to_thread(_share_blocking, directory)
    except OSError as exc:
        log.error("mounts directory not shared dir=%s error=%s", directory, exc)
        raise Internal(f"cannot make {directory} a shared mount: {exc}") from exc


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = bytearray(), 0
    while i < len(field):
        digits = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(digits) == 3 and digits.isdigit():
            out.append(int(digits, 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def _mount_points() -> list[str]:
    """Every mount point of our mount namespace, one entry per mount (stacked ones repeat)."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [_unescape(line.split(b" ")[4]) for line in f]


def _mounts_on(path: Path) -> int:
    target = os.path.realpath(path)
    return sum(1 for point in _mount_points() if point == target)


def _unmount_blocking(target: Path) -> bool:
    """Unmount everything stacked on target, lazily when busy; True if something was mounted.
    Then remove the directory (gone already: fine)."""
    found = False
    for _ in range(_MAX_STACKED):
        if not _mounts_on(target):
            break
        found = True
        try:
            mountutil.umount(str(target))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # A straggler (a `du` of the upper dir, an exec being torn down) holds it: detach
            # now, the kernel frees the filesystem (and an autoclear loop device) at its last
            # user.
            log.warning("mount busy, detaching lazily target=%s", target)
            mountutil.umount(str(target), mountutil.MNT_DETACH)
    try:
        target.rmdir()
    except FileNotFoundError:
        pass
    return found


async def _run_mount(*args: str) -> tuple[int, str]:
    proc = await spawn.spawn([MOUNT, *args], stdout=spawn.PIPE, stderr=spawn.STDOUT)
    try:
        output, _ = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace").strip()[-500:]


async def _mount_erofs(erofs: Path, target: Path) -> str:
    """Mount erofs read-only at target; returns how ("file" or "loop")."""
    try:
        # Linux >= 6.12 mounts an EROFS regular file directly: no loop device to allocate.
        await asyncio.to_thread(mountutil.mount, str(erofs), str(target), "erofs",
                                mountutil.MS_RDONLY | mountutil.MS_NODEV)
        return "file"
    except OSError as exc:
        if exc.errno not in _NEEDS_LOOP:
            raise Internal(f"mount image {erofs} at {target}: {exc.strerror}") from exc
        file_error = exc.strerror
    # Older kernels: util-linux sets up a read-only loop device with autoclear, so the device
    # frees itself at the last unmount.
    code, output = await _run_mount("-t", "erofs", "-o", "ro,nodev,loop", "--", str(erofs),
                                    str(target))
    if code != 0:
        raise FailedPrecondition(
            f"image snapshot {erofs} cannot be mounted (not a valid EROFS image, or no erofs "
            f"support in the kernel): file-backed: {file_error}; {MOUNT} -o loop exited "
            f"{code}: {output}")
    return "loop"


def _check_key(key: str) -> None:
    if not key or "/" in key or key in (".", "..") or "\0" in key:
        raise InvalidArgument(f"bad image mount key {key!r}")


class ImageMounts:
    """The read-only mount of each image file at `directory`/<key>, shared by the containers
    using it. Counts live in memory only: at start `recover` gets them from the container
    records. One lock per key: two first users of an image mount it once, other images wait
    for nobody."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._users: dict[str, int] = {}
        self._mounted: set[str] = set()  # keys known to be mounted in this process
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.directory / key

    def users(self, key: str) -> int:
        return self._users.get(key, 0)

    async def _ensure(self, key: str, erofs: Path) -> Path:
        """Mount key's image if it is not mounted; call with the key's lock held."""
        target = self.path(key)
        if key in self._mounted:
            return target
        await share_directory(self.directory)
        if await asyncio.to_thread(_mounts_on, target):
            self._mounted.add(key)  # mounted before a restart: adopt it
            return target
        if not await asyncio.to_thread(erofs.is_file):
            raise FailedPrecondition(f"image snapshot {erofs} is missing: pull the image again")
        await asyncio.to_thread(target.mkdir, exist_ok=True)
        try:
            how = await _mount_erofs(erofs, target)
        except BaseException as exc:
            await asyncio.to_thread(_rmdir_quietly, target)
            if not isinstance(exc, asyncio.CancelledError):
                log.error("image mount failed key=%s file=%s error=%s", key, erofs, exc)
            raise
        self._mounted.add(key)
        log.info("image mounted key=%s file=%s target=%s how=%s", key, erofs, target, how)
        return target

    async def acquire(self, key: str, erofs: Path) -> Path:
        """The mount point of image file `erofs`, mounted on its first use; count one user.

        :raises FailedPrecondition: the file is missing or cannot be mounted as EROFS.
        :raises Internal: the mount failed for another reason (the error names it).
        """
        async with self._lock(key):
            target = await self._ensure(key, erofs)
            self._users[key] = self._users.get(key, 0) + 1
            return target

    async def ensure_mounted(self, key: str, erofs: Path) -> Path:
        """As acquire, without counting a user: for a container `recover` already counted
        whose image mount is gone (say the state dir was on a tmpfs and the host rebooted)."""
        async with self._lock(key):
            return await self._ensure(key, erofs)

    async def release(self, key: str) -> None:
        """One user fewer; the last one unmounts (lazily if busy). A key with no user: no-op."""
        async with self._lock(key):
            users = self._users.get(key, 0)
            if users <= 0:
                log.debug("image release without user key=%s", key)
                return
            if users > 1:
                self._users[key] = users - 1
                return
            del self._users[key]
            self._mounted.discard(key)
            target = self.path(key)
            try:
                await asyncio.to_thread(_unmount_blocking, target)
            except OSError as exc:
                log.error("image unmount failed key=%s target=%s error=%s", key, target, exc)
                raise Internal(f"unmount image at {target}: {exc}") from exc
            log.info("image unmounted key=%s target=%s", key, target)

    async def recover(self, in_use: Mapping[str, int]) -> None:
        """At daemon start: take the counts from the container records (key -> users) and
        unmount every image mount in the directory nobody uses. Used but missing mounts are
        mounted again on the next acquire or ensure_mounted."""
        self._users = {key: n for key, n in in_use.items() if n > 0}
        self._mounted.clear()
        await share_directory(self.directory)

        def stale() -> list[Path]:
            base = os.path.realpath(self.directory)
            mounted = {os.path.basename(p) for p in _mount_points()
                       if os.path.dirname(p) == base}
            present = {entry.name for entry in os.scandir(base) if entry.is_dir()}
            return [self.directory / name for name in sorted(mounted | present)
                    if name not in self._users]

        for target in await asyncio.to_thread(stale):
            try:
                if await asyncio.to_thread(_unmount_blocking, target):
                    log.info("stale image mount removed target=%s", target)
            except OSError as exc:
                # A leftover is not worth refusing to start over: log it and go on.
                log.error("stale image unmount failed target=%s error=%s", target, exc)

    def _lock(self, key: str) -> asyncio.Lock:
        _check_key(key)
        return self._locks.setdefault(key, asyncio.Lock())


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _check_overlay_path(path: Path) -> None:
    # overlayfs splits its options on "," and lowerdir on ":"; escaping is not worth it for
    # paths we choose ourselves.
    if any(c in str(path) for c in ",:\\"):
        raise InvalidArgument(f"overlay path {str(path)!r} contains ',', ':' or '\\'")


async def mount_tmpfs(target: Path, options: str) -> None:
    """A tmpfs at `target` (created), e.g. a pod's /dev/shm."""
    await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
    code, output = await _run_mount("-t", "tmpfs", "-o", options, "tmpfs", str(target))
    if code != 0:
        raise Internal(f"mount tmpfs on {target}: {output}")


async def mount_container_rootfs(lower: Path, upper_dir: Path, work_dir: Path,
                                 target: Path) -> None:
    """An overlay of `lower` (an image mount) with upper_dir and work_dir (created, same
    filesystem) at target (created).

    :raises Internal: the mount failed; the message has the kernel's error.
    """
    for path in (lower, upper_dir, work_dir, target):
        _check_overlay_path(path)
    options = f"lowerdir={lower},upperdir={upper_dir},workdir={work_dir},index=off"

    def work() -> None:
        for d in (upper_dir, work_dir, target):
            d.mkdir(parents=True, exist_ok=True)
        mountutil.mount("overlay", str(target), "overlay", 0, options)

    try:
        await asyncio.to_thread(work)
    except OSError as exc:
        log.error("overlay mount failed target=%s options=%s error=%s", target, options, exc)
        raise Internal(f"mount container rootfs at {target}: {exc}") from exc
    log.info("container rootfs mounted target=%s lower=%s", target, lower)


async def unmount(target: Path) -> None:
    """Unmount target (lazily if busy; not mounted: fine) and remove the directory.

    :raises Internal: umount failed for another reason than busy.
    """
    try:
        await asyncio.to_thread(_unmount_blocking, target)
    except OSError as exc:
        log.error("unmount failed target=%s error=%s", target, exc)
        raise Internal(f"unmount {target}: {exc}") from exc


async def remove_tree(path: Path) -> None:
    """Remove a container's directory (upper and work dirs) in a thread; errors are ignored.
    Unmount first: removal goes through any mount still inside."""
    await _remove_tree(str(path))


def writable_layer_bytes(upper: Path) -> int:
    """Disk bytes of the container's upper dir. Blocking (walks the tree): use a thread."""
    return dir_bytes(str(upper))
