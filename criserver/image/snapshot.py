"""Snapshots: an image's flattened root filesystem as one read-only EROFS file.

`<root>/image/snapshots/<image hex>.erofs` is built once per image (layers unpacked into a temp
dir in a worker thread, `mkfs.erofs`, atomic rename, temp dir removed) and shared by every
container and pod using the image; the guest mounts it read-only under an overlay.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path

from criserver.errors import Internal
from criserver.flight import SingleFlight
from criserver.image.unpack import Limits, apply_layers

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
MKFS = "mkfs.erofs"
SUFFIX = ".erofs"


class SnapshotStore:
    def __init__(self, root: Path, limits: Limits) -> None:
        self.dir = root / "snapshots"
        self.limits = limits
        self._flight: SingleFlight[Path] = SingleFlight()

    async def start(self) -> None:
        await asyncio.to_thread(self._clean_leftovers)

    def _clean_leftovers(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for entry in self.dir.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                log.info("removing leftover snapshot temp path=%s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def path(self, image_id: str) -> Path:
        return self.dir / (image_id.removeprefix("sha256:") + SUFFIX)

    def image_ids(self) -> set[str]:
        """Image ids that have a built snapshot (a directory listing: call from a thread)."""
        return {f"sha256:{p.name[:-len(SUFFIX)]}" for p in self.dir.glob(f"*{SUFFIX}")}

    async def ensure(self, image_id: str, layers: list[tuple[Path, str, str, str]]) -> Path:
        """The snapshot of `image_id`, built from (blob, compression, diff_id, name) layers
        unless it exists. Concurrent calls for one image build it once."""
        final = self.path(image_id)
        if await asyncio.to_thread(final.exists):
            return final
        return await self._flight.run(image_id, lambda: self._build(image_id, layers))

    async def _build(self, image_id: str, layers: list[tuple[Path, str, str, str]]) -> Path:
        final = self.path(image_id)
        tmp = self.dir / f"{TMP_PREFIX}{image_id.removeprefix('sha256:')[:16]}-" \
                         f"{secrets.token_hex(4)}"
        rootfs = tmp / "rootfs"
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.to_thread(_make_root, rootfs)
            unpack = asyncio.ensure_future(
                asyncio.to_thread(apply_layers, rootfs, layers, self.limits, cancel)
            )
            try:
                stats = await asyncio.shield(unpack)
            except asyncio.CancelledError:
                cancel.set()  # the worker stops at its next read; wait so the temp dir can go
                await asyncio.wait([unpack])
                raise
            unpacked = loop.time()
            image = tmp / "image.erofs"
            await _mkfs(image, rootfs, image_id)
            await asyncio.to_thread(_publish, image, final)
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, tmp, True))
        log.info("snapshot built image_id=%s layers=%d entries=%d bytes=%d skipped=%d "
                 "unpack_s=%.2f mkfs_s=%.2f", image_id, len(layers),
                 sum(s.entries for s in stats), sum(s.bytes for s in stats),
                 sum(s.skipped for s in stats), unpacked - started, loop.time() - unpacked)
        return final

    async def remove(self, image_ids: set[str]) -> None:
        def unlink_all() -> None:
            for image_id in image_ids:
                self.path(image_id).unlink(missing_ok=True)

        await asyncio.to_thread(unlink_all)


def _make_root(rootfs: Path) -> None:
    rootfs.mkdir(parents=True, mode=0o755)
    os.chmod(rootfs, 0o755)


def _publish(image: Path, final: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(image, final)
    dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def _mkfs(image: Path, rootfs: Path, image_id: str) -> None:
    # Uncompressed (the default): fastest to build and to read under TCG; mtimes kept as is.
    proc = await asyncio.create_subprocess_exec(
        MKFS, "--quiet", "--preserve-mtime", str(image), str(rootfs),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        text = output.decode(errors="replace")
        if "No space left on device" in text or "Disk quota exceeded" in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(image))
        raise Internal(f"image {image_id}: {MKFS} failed ({proc.returncode}): "
                       f"{text.strip()[-500:]}")
