"""Image volumes (CRI Mount.image) in the guest: the image's EROFS file is mounted the one way
images are (`Mounts.acquire_image`: once per pod, shared with the containers whose root it is),
and the requested path of it is bound at the guest path the container's spec binds in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent import mountutil
from vmagent.api import agent_pb2 as pb
from vmagent.rootfs import Mounts
from vmagent.users import resolve_in_root

log = logging.getLogger("vmagent")


class ImageVolume:
    """One image volume of a container: its bind mount and the image it holds."""

    def __init__(self, target: str, image_key: str) -> None:
        self.target = target
        self.image_key = image_key


async def mount_volume(mounts: Mounts, m: pb.Mount, container_id: str) -> ImageVolume:
    """Bind `m.sub_path` of image `m.source` (the image's root when empty) at `m.target`.

    :raises GRPCError: INVALID_ARGUMENT for a target outside the agent's run directory,
        NOT_FOUND when the image lacks the sub path (or the image file is missing).
    """
    target = m.target
    if posixpath.normpath(target) != target or not target.startswith(mounts.run_dir + "/"):
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"container {container_id}: image volume target {target!r} is not a "
                        f"path under {mounts.run_dir}")
    root, key = await mounts.acquire_image(pb.Mount(type=m.type, source=m.source))
    try:
        await asyncio.to_thread(_bind, root, m.sub_path, target, container_id)
    except BaseException:
        await mounts.release_image(key)
        raise
    log.info("image volume mounted id=%s image=%s sub_path=%s target=%s", container_id,
             m.source, m.sub_path or "/", target)
    return ImageVolume(target, key)


def _bind(root: str, sub_path: str, target: str, container_id: str) -> None:
    # Resolved inside the image: a symlink in it must not reach the guest's own files.
    source = resolve_in_root(root, sub_path)
    if source is None:
        raise GRPCError(Status.NOT_FOUND,
                        f"container {container_id}: image volume sub path {sub_path!r} does "
                        "not exist in the image")
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:  # a file: bound onto a file
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    if not mountutil.is_mountpoint(target):  # a retried create
        # The image's EROFS is read-only, and so is every bind of it.
        mountutil.mount(source, target, "", mountutil.MS_BIND)


async def unmount_volume(mounts: Mounts, volume: ImageVolume) -> None:
    """Undo `mount_volume`; the image stays mounted while other containers use it."""
    await asyncio.to_thread(_unbind, volume.target)
    await mounts.release_image(volume.image_key)


def _unbind(target: str) -> None:
    mountutil.umount(target, mountutil.MNT_DETACH)
    # Never a recursive delete: only the empty mount point and its per-container directory.
    with contextlib.suppress(OSError):
        if os.path.isdir(target):
            os.rmdir(target)
        else:
            os.unlink(target)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(target))
