"""Host directories a pod's VM sees over virtio-9p.

Two shares per pod: the image snapshots (read-only, the same directory for every pod: each
container's root filesystem is one EROFS file in it) and the pod's volumes directory
(read-write). A CRI mount's host path (kubelet's emptyDir, configMap, secret, hostPath) is
bind-mounted into the pod's volumes directory under a name of ours, so the guest sees it under
/run/criserver/shared/<name> while the data stays on the host.

Read-only volumes are made read-only here, on the host, where the guest cannot undo it: the
bind's top mount for `ro` (mounts below it stay as they are, as runc's `ro`), every mount of
it for `rro`. 9p shows the guest one file system without the host's mounts below the volume,
so the guest gets those mount points as binds of their own (`with_submounts`). Their copies
are moved out of the volume's bind to mount points of ours beside it: a copy left mounted on
the host path's own directory would pin it, and the host could not remove that directory
once it unmounts its original (critest's read-only mount specs do just that).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criserver.errors import FailedPrecondition, InvalidArgument, NotFound
from criserver.vm.qemu import Share
from vmagent.contract import IMAGES_TAG, SHARED_DIR, SHARED_TAG

log = logging.getLogger(__name__)

GUEST_VOLUMES_DIR = SHARED_DIR

_MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 4096, 8192, 16384, 1 << 18
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
MODES = ("rw", "ro", "rro")  # a volume's access: read-write, read-only, recursively read-only
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@dataclass(frozen=True)
class Submount:
    """A host mount point below a volume: where it is in the volume, whether it is read-only,
    and where the guest finds its copy."""

    path: str  # relative to the volume
    read_only: bool
    guest_source: str


@dataclass(frozen=True)
class Volume:
    """A volume as the guest sees it: its path, and the mount points below it on the host
    (parents first)."""

    guest_path: str
    submounts: tuple[Submount, ...] = ()


def pod_shares(images_dir: Path, volumes_dir: Path) -> tuple[Share, ...]:
    return (Share(IMAGES_TAG, images_dir, read_only=True),
            Share(SHARED_TAG, volumes_dir, read_only=False))


def prepare_volumes_root(root: Path) -> None:
    """Make the directory holding every pod's volumes a private mount of its own (once per
    daemon start): the volume binds below it then never propagate to other mount namespaces,
    where copies would pin the directories and keep host data mounted."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _is_mount_point(root):
        _mount(root, root, _MS_BIND)
    _mount(None, root, _MS_PRIVATE | _MS_REC)


class PodVolumes:
    """The bind mounts of one pod's volumes directory (below a `prepare_volumes_root` root)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def name_for(container_id: str, host_path: str, mode: str = "rw") -> str:
        digest = hashlib.sha256(host_path.encode()).hexdigest()[:16]
        # One bind per access mode: a container may mount one path read-write and read-only.
        return f"{container_id[:16]}-{digest}" + ("" if mode == "rw" else f"-{mode}")

    async def bind(self, container_id: str, host_path: str, mode: str = "rw") -> Volume:
        """Expose `host_path` to the guest with access `mode` (one of MODES).

        :raises InvalidArgument: a relative path; NotFound: it does not exist.
        """
        if not os.path.isabs(host_path):
            raise InvalidArgument(f"mount host path {host_path!r} is not absolute")
        if mode not in MODES:
            raise InvalidArgument(f"mount host path {host_path}: unknown mode {mode!r}")
        name = self.name_for(container_id, host_path, mode)
        return await asyncio.to_thread(self._bind, Path(host_path), name, mode)

    def _bind(self, source: Path, name: str, mode: str) -> Volume:
        if not source.exists():
            raise NotFound(f"mount host path {source} does not exist")
        target = self.directory / name
        self._release_exact(name)  # the same container's retry binds afresh
        _make_mount_point(target, directory=source.is_dir())
        _mount(source, target, _MS_BIND | _MS_REC)
        if mode != "rw":
            _set_read_only(target, recursive=mode == "rro")
        moved: dict[str, str] = {}  # path in the volume -> guest path of its moved copy
        submounts = []
        for index, (rel, read_only) in enumerate(submounts_of(target)):
            parent = next((p for p in moved if rel.startswith(p + "/")), None)
            if parent is not None:  # moved along with its parent
                guest_source = f"{moved[parent]}/{rel[len(parent) + 1:]}"
            else:
                aside = self.directory / f"{name}.m{index}"
                _make_mount_point(aside, directory=True)
                _mount(target / rel, aside, _MS_MOVE)
                guest_source = moved[rel] = f"{GUEST_VOLUMES_DIR}/{aside.name}"
            submounts.append(Submount(rel, read_only or mode == "rro", guest_source))
        return Volume(f"{GUEST_VOLUMES_DIR}/{name}", tuple(submounts))

    async def release(self, container_id: str) -> None:
        """Unmount and remove every volume of one container; idempotent."""
        await asyncio.to_thread(self._release, f"{container_id[:16]}-")

    async def remove_all(self) -> None:
        """Unmount everything and remove the directory. Never a recursive delete: a bind mount
        that failed to unmount would expose the host data behind it."""
        await asyncio.to_thread(self._release, "")
        try:
            await asyncio.to_thread(self.directory.rmdir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("pod volumes directory left behind dir=%s error=%s", self.directory, exc)

    def _release_exact(self, name: str) -> None:
        """Unmount one volume and the mounts moved aside from it."""
        self._release(name, lambda entry: entry == name or entry.startswith(f"{name}.m"))

    def _release(self, prefix: str,
                 match: Callable[[str], bool] | None = None) -> None:
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            if not (match(entry.name) if match else entry.name.startswith(prefix)):
                continue
            _unmount(entry)
            try:
                if entry.is_dir() and not entry.is_symlink():
                    entry.rmdir()
                else:
                    entry.unlink(missing_ok=True)
            except OSError as exc:  # an empty mount point left behind is harmless
                log.warning("volume mount point left behind path=%s error=%s", entry, exc)
        log.debug("volumes released dir=%s prefix=%s", self.directory, prefix)


def with_submounts(mounts: list[dict[str, Any]], volumes: dict[str, Volume]
                   ) -> list[dict[str, Any]]:
    """OCI mounts with, after each bind of a volume that has mount points below it on the
    host, a bind of each of them (read-only only where the host's is): runc's `ro` then makes
    only the volume's top read-only in the guest too. `volumes` is keyed by guest path."""
    out: list[dict[str, Any]] = []
    for m in mounts:
        out.append(m)
        volume = volumes.get(m.get("source", "")) if m.get("type") == "bind" else None
        if volume is None:
            continue
        options = [o for o in m.get("options") or [] if o not in ("ro", "rw", "rro")]
        for sub in volume.submounts:
            out.append({"destination": f"{m['destination'].rstrip('/')}/{sub.path}",
                        "type": "bind", "source": sub.guest_source,
                        "options": [*options, "ro" if sub.read_only else "rw"]})
    return out


def submounts_of(target: Path) -> tuple[tuple[str, bool], ...]:
    """Mount points strictly below `target` in this mount namespace: (relative path,
    read-only), parents first."""
    prefix = str(target).rstrip("/") + "/"
    found: dict[str, bool] = {}
    with open("/proc/self/mountinfo") as f:  # procfs
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            if point.startswith(prefix):
                found[point[len(prefix):]] = "ro" in fields[5].split(",")
    return tuple(sorted(found.items(), key=lambda item: item[0].count("/")))


def _is_mount_point(path: Path) -> bool:
    # Not os.path.ismount: it compares devices, and a bind from the same file system has the
    # same device as its parent directory.
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:  # procfs
        return any(_unescape(line.split()[4]) == want for line in f)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _set_read_only(target: Path, recursive: bool) -> None:
    # mount_setattr changes only the read-only flag (a bind remount would reset nosuid & co.).
    attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
    flags = _AT_RECURSIVE if recursive else 0
    if _libc.mount_setattr(_AT_FDCWD, str(target).encode(), flags, ctypes.byref(attr),
                           ctypes.sizeof(attr)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"make {target} read-only: {os.strerror(code)}")


def _make_mount_point(path: Path, *, directory: bool) -> None:
    """An empty directory or file at `path` in the pod's volumes directory, which the guest
    writes too: whatever it put there (a symlink out of the share, a fifo) is never followed
    or opened. An entry of the right kind is reused (a mount point left behind)."""
    try:
        if directory:
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644))
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        raise FailedPrecondition(f"volume mount point {path} exists and is not a "
                                 f"{'directory' if directory else 'file'}: made by the guest?")


def _mount(source: Path | None, target: Path, flags: int) -> None:
    """Mount onto `target` itself: a symlink there (the guest's) is refused, not followed,
    and one swapped in after the check is not seen (the mount goes through an O_PATH fd)."""
    src = str(source).encode() if source is not None else None
    fd = os.open(target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, f"mount {source} -> {target}: the target is a symlink")
        if _libc.mount(src, f"/proc/self/fd/{fd}".encode(), None, flags, None) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"mount {source} -> {target}: {os.strerror(code)}")
    finally:
        os.close(fd)


def _unmount(path: Path) -> None:
    """Unmount everything mounted on `path`; never what a symlink there points to (a guest
    may have put one in the volumes directory, named like a volume)."""
    if path.is_symlink():
        return
    while _is_mount_point(path):
        if _libc.umount2(str(path).encode(), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOENT):
                return
            raise OSError(code, f"unmount {path}: {os.strerror(code)}")
