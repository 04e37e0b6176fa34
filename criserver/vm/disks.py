"""Disk files of whole machines: qcow2 disks, empty or copy-on-write over a read-only base made
once per OS image, grown to a size, and removed; bases removed once nothing needs them.

Files only, no running VM: a live resize is QMP block_resize on the running QEMU (vm.py's
caller). Every qemu-img runs as a child process through criserver/spawn.py; file work runs in
threads. A disk.img comes from a registry, so it is distrusted: raw or qcow2 only, and a qcow2
that names a backing or data file (a host file the guest would then read) is refused.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criserver import spawn
from criserver.errors import FailedPrecondition, Internal, InvalidArgument, NotFound

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
# Formats a disk.img may have: each is read by QEMU itself, with no other file involved.
BASE_FORMATS = ("raw", "qcow2")
# Far beyond any real disk; stops a typo of units from making an unusable 8 EiB file.
MAX_DISK_BYTES = 1 << 50  # 1 PiB
QCOW2_MAGIC = b"QFI\xfb"
# qemu-img's message when QEMU holds the file's write lock (a running VM).
_LOCKED = "Failed to get"


@dataclass(frozen=True)
class DiskImage:
    """What qemu-img says of a disk file."""

    path: Path
    format: str  # "qcow2", "raw", ...
    virtual_size: int  # bytes the guest sees
    backing: str = ""  # the backing file a qcow2 names ("" for none)


@dataclass(frozen=True)
class Base:
    """A read-only base disks are copy-on-write over: one per OS image (`key`)."""

    key: str
    path: Path
    format: str  # raw or qcow2: the backing format written into each disk
    virtual_size: int


async def _qemu_img(*args: str, what: str) -> bytes:
    """Run qemu-img; its stdout.

    :raises FailedPrecondition: the file is locked by a running VM.
    :raises Internal: any other failure (its stderr in the message).
    """
    try:
        child = await spawn.spawn([QEMU_IMG, *args], stdout=spawn.PIPE, stderr=spawn.PIPE)
    except FileNotFoundError:
        raise Internal(f"{what}: {QEMU_IMG} is not installed (Debian package qemu-utils)") \
            from None
    try:
        out, err = await child.communicate()
    except BaseException:
        child.kill()
        await child.wait()
        raise
    if child.returncode != 0:
        message = err.decode(errors="replace").strip()[-1000:]
        if _LOCKED in message and "lock" in message:
            raise FailedPrecondition(f"{what}: the disk is in use by a running VM ({message})")
        raise Internal(f"{what}: qemu-img exited {child.returncode}: {message}")
    return out


async def inspect(path: Path, fmt: str | None = None) -> DiskImage:
    """Format, virtual size and backing file of a disk file (probed unless `fmt` is given).
    Safe on a file a running VM uses (shared read, no lock).

    :raises InvalidArgument: not a disk image qemu-img can read.
    """
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    try:
        out = await _qemu_img(*args, str(path), what=f"disk {path}")
    except Internal as exc:
        raise InvalidArgument(f"disk {path}: not a readable disk image: {exc}") from None
    info: dict[str, Any] = json.loads(out)
    specific = info.get("format-specific", {}).get("data", {})
    if specific.get("data-file"):
        raise InvalidArgument(f"disk {path}: a qcow2 with an external data file "
                              f"({specific['data-file']}) is refused")
    return DiskImage(path, str(info.get("format", "")), int(info.get("virtual-size", 0)),
                     str(info.get("full-backing-filename") or info.get("backing-filename") or ""))


def _check_size(size_bytes: int, what: str) -> None:
    if size_bytes <= 0:
        raise InvalidArgument(f"{what}: size {size_bytes} must be positive")
    if size_bytes > MAX_DISK_BYTES:
        raise InvalidArgument(f"{what}: size {size_bytes} is beyond the limit of "
                              f"{MAX_DISK_BYTES} bytes")


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")


class Bases:
    """The bases under `dir`, one per key, each made once (concurrent callers share it)."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self._making: dict[str, asyncio.Task[Base]] = {}
        self._made: dict[str, Base] = {}  # saves a qemu-img per disk made

    def path(self, key: str, fmt: str) -> Path:
        return self.dir / f"{key}.{fmt}"

    async def ensure(self, key: str, source: Path) -> Base:
        """The base of `key` (e.g. an OS image id's hex), made from the disk.img `source` the
        first time: hard-linked when on the same filesystem (blobs never change), else copied.

        :raises InvalidArgument: `source` is neither raw nor a self-contained qcow2.
        """
        if not key or "/" in key or key.startswith("."):
            raise InvalidArgument(f"base key {key!r} is not a plain name")
        made = self._made.get(key)
        if made is not None and await asyncio.to_thread(made.path.exists):
            return made
        task = self._making.get(key)
        if task is None:
            task = asyncio.ensure_future(self._make(key, source))
            self._making[key] = task
            task.add_done_callback(lambda _t: self._making.pop(key, None))
        base = await asyncio.shield(task)
        self._made[key] = base
        return base

    async def _make(self, key: str, source: Path) -> Base:
        for fmt in BASE_FORMATS:
            existing = self.path(key, fmt)
            if await asyncio.to_thread(existing.exists):
                image = await inspect(existing, fmt)
                return Base(key, existing, fmt, image.virtual_size)
        probed = await inspect(source)
        if probed.format not in BASE_FORMATS:
            raise InvalidArgument(f"os image disk {source.name}: format {probed.format!r} is "
                                  f"not supported (only {', '.join(BASE_FORMATS)})")
        if probed.backing:
            raise InvalidArgument(f"os image disk {source.name}: a qcow2 naming a backing file "
                                  f"({probed.backing}) is refused")
        target = self.path(key, probed.format)
        await asyncio.to_thread(self._place, source, target)
        log.info("disk base made key=%s format=%s virtual_size=%d", key, probed.format,
                 probed.virtual_size)
        return Base(key, target, probed.format, probed.virtual_size)

    def _place(self, source: Path, target: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(target)
        try:
            try:
                os.link(source, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(source, tmp)
            os.rename(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    async def prune(self, disks: Iterable[Path], keep: Iterable[str]) -> list[str]:
        """Remove every base that no disk in `disks` is backed by and whose key is not in
        `keep` (the OS images still present); returns the keys removed."""
        return await asyncio.to_thread(self._prune, list(disks), set(keep))

    def _prune(self, disks: list[Path], keep: set[str]) -> list[str]:
        used = set()
        for disk in disks:
            backing = backing_file(disk)
            if backing:
                used.add(os.path.realpath(backing))
        removed = []
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            key, _, fmt = entry.name.rpartition(".")
            if entry.name.startswith(".tmp-") or fmt not in BASE_FORMATS:
                continue
            if key in keep or key in self._making or os.path.realpath(entry.path) in used:
                continue
            os.unlink(entry.path)
            self._made.pop(key, None)
            removed.append(key)
            log.info("disk base removed key=%s", key)
        return removed


def backing_file(path: Path) -> str:
    """The backing file a qcow2 disk names, read from its header ("" for none or not qcow2).
    Blocking: call in a thread."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return ""
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return ""
            f.seek(offset)
            return f.read(size).decode(errors="replace")
    except FileNotFoundError:
        return ""


async def create(path: Path, size_bytes: int, base: Base | None = None) -> DiskImage:
    """Make the qcow2 disk `path` of `size_bytes`: empty, or copy-on-write over `base`.
    An existing `path` is kept as it is (a retried create after a crash: the file appears only
    complete, by rename).

    :raises InvalidArgument: a size that is not positive, too large, or smaller than the
        base's virtual size.
    """
    what = f"disk {path}"
    _check_size(size_bytes, what)
    if base is not None and size_bytes < base.virtual_size:
        raise InvalidArgument(f"{what}: size {size_bytes} is smaller than its image's "
                              f"{base.virtual_size} bytes")
    if await asyncio.to_thread(path.exists):
        return await inspect(path, "qcow2")
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        args = ["create", "-q", "-f", "qcow2"]
        if base is not None:
            args += ["-F", base.format, "-b", str(base.path.resolve())]
        await _qemu_img(*args, str(tmp), str(size_bytes), what=what)
        await asyncio.to_thread(os.rename, tmp, path)
    finally:
        await asyncio.to_thread(tmp.unlink, True)
    log.info("disk created path=%s size=%d base=%s", path, size_bytes,
             base.key if base else "")
    return DiskImage(path, "qcow2", size_bytes, str(base.path.resolve()) if base else "")


async def resize(path: Path, size_bytes: int) -> DiskImage:
    """Grow the disk file `path` (not in use by a VM: a running one is resized over QMP) to
    `size_bytes`; the same size is no change.

    :raises InvalidArgument: shrinking, or a size out of range.
    :raises FailedPrecondition: a running VM holds the disk.
    :raises NotFound: no such disk.
    """
    what = f"disk {path}"
    _check_size(size_bytes, what)
    if not await asyncio.to_thread(path.exists):
        raise NotFound(f"{what} does not exist")
    current = await inspect(path, "qcow2")
    if size_bytes < current.virtual_size:
        raise InvalidArgument(f"{what}: cannot shrink from {current.virtual_size} to "
                              f"{size_bytes} bytes")
    if size_bytes == current.virtual_size:
        return current
    await _qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size_bytes), what=what)
    log.info("disk resized path=%s size=%d", path, size_bytes)
    return DiskImage(path, "qcow2", size_bytes, current.backing)


async def remove(path: Path) -> None:
    """Delete the disk file; a missing one is no error."""
    await asyncio.to_thread(path.unlink, True)
    log.info("disk removed path=%s", path)
