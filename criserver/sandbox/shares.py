"""Host directories a pod's VM sees over virtio-9p.

Two shares per pod: the image snapshots (read-only, the same directory for every pod: each
container's root filesystem is one EROFS file in it) and the pod's volumes directory
(read-write). A CRI mount's host path (kubelet's emptyDir, configMap, secret, hostPath) is
bind-mounted into the pod's volumes directory under a name of ours, so the guest sees it under
/run/criserver/shared/<name> while the data stays on the host.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
from pathlib import Path

from criserver.errors import InvalidArgument, NotFound
from criserver.sandbox.qemu import Share

log = logging.getLogger(__name__)

IMAGES_TAG = "criserver.images"
VOLUMES_TAG = "criserver.shared"
GUEST_VOLUMES_DIR = "/run/criserver/shared"

_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def pod_shares(images_dir: Path, volumes_dir: Path) -> tuple[Share, ...]:
    return (Share(IMAGES_TAG, images_dir, read_only=True),
            Share(VOLUMES_TAG, volumes_dir, read_only=False))


def prepare_volumes_root(root: Path) -> None:
    """Make the directory holding every pod's volumes a private mount of its own (once per
    daemon start): the volume binds below it then never propagate to other mount namespaces,
    where copies would pin the directories and keep host data mounted."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.path.ismount(root):
        _mount(root, root, _MS_BIND)
    _mount(None, root, _MS_PRIVATE | _MS_REC)


class PodVolumes:
    """The bind mounts of one pod's volumes directory (below a `prepare_volumes_root` root)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def name_for(container_id: str, host_path: str) -> str:
        digest = hashlib.sha256(host_path.encode()).hexdigest()[:16]
        return f"{container_id[:16]}-{digest}"

    async def bind(self, container_id: str, host_path: str) -> str:
        """Expose `host_path` to the guest; return its guest path.

        :raises InvalidArgument: a relative path; NotFound: it does not exist.
        """
        if not os.path.isabs(host_path):
            raise InvalidArgument(f"mount host path {host_path!r} is not absolute")
        name = self.name_for(container_id, host_path)
        await asyncio.to_thread(self._bind, Path(host_path), self.directory / name)
        return f"{GUEST_VOLUMES_DIR}/{name}"

    def _bind(self, source: Path, target: Path) -> None:
        if not source.exists():
            raise NotFound(f"mount host path {source} does not exist")
        if target.exists() and os.path.ismount(target):
            return  # the same container's retry
        if source.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.touch(exist_ok=True)
        _mount(source, target, _MS_BIND | _MS_REC)

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

    def _release(self, prefix: str) -> None:
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            if not entry.name.startswith(prefix):
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


def _mount(source: Path | None, target: Path, flags: int) -> None:
    src = str(source).encode() if source is not None else None
    if _libc.mount(src, str(target).encode(), None, flags, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} -> {target}: {os.strerror(code)}")


def _unmount(path: Path) -> None:
    while os.path.ismount(path):
        if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOENT):
                return
            raise OSError(code, f"unmount {path}: {os.strerror(code)}")
