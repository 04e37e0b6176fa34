"""Applying layer tars onto a directory, safely: the flattened root filesystem of an image.

Runs in a worker thread (all blocking). Every entry's parent path is resolved component by
component inside the root, symlinks included (an absolute or `..` target is re-rooted, never
followed out); the entry itself is created with O_EXCL/O_NOFOLLOW after removing what was there.
Whiteouts (`.wh.<name>`, `.wh..wh..opq`) hide lower layers; bombs are stopped by byte and entry
limits; device nodes are skipped unless allowed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from criserver.errors import FailedPrecondition, out_of_space

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINKS = 40
READ_CHUNK = 1024 * 1024
# xattr namespaces a layer may set: trusted.* (overlay metadata) and security.selinux are ours
# or the guest's to decide, not the image's.
_XATTR_ALLOWED = ("user.", "security.capability")


class LayerError(FailedPrecondition):
    """A layer cannot be applied: hostile, corrupt, over a limit, or not matching its diff_id."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_entries: int
    allow_devices: bool


@dataclass(frozen=True)
class LayerStats:
    entries: int
    bytes: int
    skipped: int


class _CountingReader:
    """The decompressed tar stream: hashed (diff_id), counted and capped (bombs)."""

    def __init__(self, raw: IO[bytes], limit: int, what: str, cancel: threading.Event) -> None:
        self.raw = raw
        self.limit = limit
        self.what = what
        self.cancel = cancel
        self.count = 0
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        if self.cancel.is_set():
            raise LayerError(f"{self.what}: unpack cancelled")
        data = self.raw.read(n if n >= 0 else READ_CHUNK)
        self.count += len(data)
        if self.count > self.limit:
            raise LayerError(
                f"{self.what}: uncompressed size exceeds max_layer_bytes={self.limit}"
            )
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(READ_CHUNK):
            pass


def _open_decompressed(path: Path, compression: str) -> IO[bytes]:
    raw = open(path, "rb")
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return reader
    return raw


def apply_layer(
    root: Path,
    blob: Path,
    compression: str,
    diff_id: str,
    limits: Limits,
    what: str,
    cancel: threading.Event | None = None,
) -> LayerStats:
    """Apply one layer blob onto `root` and check the uncompressed stream against `diff_id`.

    :raises LayerError: hostile or broken content, a limit exceeded, or a diff_id mismatch.
    """
    cancel = cancel or threading.Event()
    stream = _open_decompressed(blob, compression)
    try:
        reader = _CountingReader(stream, limits.max_bytes, what, cancel)
        applier = _Applier(root, limits, what)
        try:
            with tarfile.open(fileobj=reader, mode="r|", bufsize=READ_CHUNK) as tar:  # type: ignore[call-overload]
                for member in tar:
                    applier.apply(tar, member)
            reader.drain()
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if isinstance(exc, LayerError) or out_of_space(exc):
                raise  # a full disk is no fault of the layer's: the caller names the store
            raise LayerError(f"{what}: corrupt layer: {exc}") from exc
        except Exception as exc:  # zstd/gzip raise their own error types on corrupt input
            if isinstance(exc, LayerError):
                raise
            raise LayerError(f"{what}: corrupt layer: {type(exc).__name__}: {exc}") from exc
        applier.finish()
    finally:
        stream.close()
    actual = f"sha256:{reader.hash.hexdigest()}"
    if actual != diff_id:
        raise LayerError(f"{what}: uncompressed content has digest {actual}, "
                         f"config says diff_id {diff_id}")
    return LayerStats(applier.entries, reader.count, applier.skipped)


def _clean(name: str) -> tuple[list[str], bool]:
    """Split a tar path into components as if rooted at '/': `..` cannot climb above the root.
    Returns the components and whether the name had to be neutralised."""
    parts: list[str] = []
    changed = name.startswith("/")
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            changed = True
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return parts, changed


class _Applier:
    def __init__(self, root: Path, limits: Limits, what: str) -> None:
        self.root = str(root)
        self.limits = limits
        self.what = what
        self.entries = 0
        self.skipped = 0
        self.is_root = os.geteuid() == 0
        self._dirs: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._this_layer: set[tuple[str, ...]] = set()
        self._dir_times: list[tuple[str, int]] = []

    # -- path resolution inside the root ---------------------------------------------------

    def _path(self, parts: tuple[str, ...] | list[str]) -> str:
        return os.path.join(self.root, *parts)

    def _resolve(self, parts: list[str], follow_last: bool) -> list[str]:
        """Canonical components of `parts` inside the root: symlinks met on the way are
        followed with the root as '/', so the result never leaves the root and contains no
        symlink (except the last component when follow_last is False)."""
        out: list[str] = []
        pending = list(reversed(parts))
        links = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            path = self._path([*out, part])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                out.append(part)
                continue
            if stat.S_ISLNK(st.st_mode) and (pending or follow_last):
                links += 1
                if links > MAX_SYMLINKS:
                    raise LayerError(f"{self.what}: too many levels of symlinks in {parts}")
                target = os.readlink(path)
                if target.startswith("/"):
                    out = []
                pending.extend(reversed(target.split("/")))
                continue
            out.append(part)
        return out

    def _parent(self, parts: list[str]) -> tuple[str, ...]:
        """Resolve and create (0755, like containerd) the parent directory of an entry."""
        key = tuple(parts)
        cached = self._dirs.get(key)
        if cached is not None:
            return cached
        resolved = self._resolve(parts, follow_last=True)
        for i in range(1, len(resolved) + 1):
            path = self._path(resolved[:i])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"{self.what}: parent {'/'.join(resolved[:i])} is not a dir")
        result = tuple(resolved)
        self._dirs[key] = result
        return result

    # -- entries ---------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise LayerError(f"{self.what}: more than max_layer_entries="
                             f"{self.limits.max_entries} entries")
        parts, changed = _clean(member.name)
        if changed:
            log.warning("layer entry path neutralised layer=%s name=%r", self.what, member.name)
        if not parts:
            return  # the root itself: keep the snapshot root's own metadata
        base = parts[-1]
        if base.startswith(WHITEOUT):
            # Whiteouts only hide what exists: never create their parent directories.
            resolved = tuple(self._resolve(parts[:-1], follow_last=True))
            if not os.path.isdir(self._path(resolved)):
                return
            hidden = base[len(WHITEOUT):]
            if base == OPAQUE:
                self._opaque(resolved)
            elif hidden in ("", ".", ".."):
                log.warning("bogus whiteout ignored layer=%s name=%r", self.what, member.name)
            elif (*resolved, hidden) not in self._this_layer:
                self._remove(self._path((*resolved, hidden)))
            return
        parent = self._parent(parts[:-1])
        target = (*parent, base)
        path = self._path(target)
        existing = _lstat(path)

        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self._remove(path)
                os.mkdir(path, 0o700)
        elif member.issym() or member.islnk() or member.isreg() or member.isfifo() \
                or member.ischr() or member.isblk():
            if member.isdev() and not member.isfifo() and not self.limits.allow_devices:
                log.info("device node skipped layer=%s name=%s", self.what, member.name)
                self.skipped += 1
                return
            if existing is not None:
                self._remove(path)
            self._create(tar, member, path)
        else:
            log.info("unsupported tar entry skipped layer=%s name=%s type=%r",
                     self.what, member.name, member.type)
            self.skipped += 1
            return
        self._this_layer.add(target)
        if not member.islnk():
            self._metadata(member, path)

    def _create(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        if member.isreg():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                src = tar.extractfile(member)
                assert src is not None
                shutil.copyfileobj(src, out, READ_CHUNK)
        elif member.issym():
            os.symlink(member.linkname, path)
            self._dirs.clear()  # a new symlink may change how cached parents resolve
        elif member.islnk():
            link_parts, _ = _clean(member.linkname)
            source = self._resolve(link_parts[:-1], follow_last=True) + link_parts[-1:]
            source_path = self._path(source)
            st = _lstat(source_path)
            if st is None or stat.S_ISDIR(st.st_mode):
                raise LayerError(f"{self.what}: hardlink {member.name} -> {member.linkname}: "
                                 "target missing or a directory")
            os.link(source_path, path, follow_symlinks=False)
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))

    def _metadata(self, member: tarfile.TarInfo, path: str) -> None:
        if self.is_root:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                self._xattr(path, key[len("SCHILY.xattr."):], value, member.name)
        if not member.issym():
            # After chown, which clears set-uid bits.
            os.chmod(path, member.mode & 0o7777)
        mtime = int(member.mtime * 1_000_000_000)
        if member.isdir():
            self._dir_times.append((path, mtime))
        else:
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    def _xattr(self, path: str, name: str, value: str, entry: str) -> None:
        if not name.startswith(_XATTR_ALLOWED):
            log.info("xattr skipped layer=%s name=%s xattr=%s", self.what, entry, name)
            return
        try:
            os.setxattr(path, name, value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False)
        except OSError as exc:
            log.info("xattr not set layer=%s name=%s xattr=%s error=%s",
                     self.what, entry, name, exc.strerror)

    def _remove(self, path: str) -> None:
        st = _lstat(path)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # never follows symlinks inside
        else:
            os.unlink(path)
        self._dirs.clear()

    def _opaque(self, parent: tuple[str, ...]) -> None:
        """Hide everything lower layers put under `parent`; keep this layer's own entries."""
        path = self._path(parent)
        for name in _listdir(path):
            child = (*parent, name)
            if child not in self._this_layer:
                self._remove(self._path(child))
            else:
                st = _lstat(self._path(child))
                if st is not None and stat.S_ISDIR(st.st_mode):
                    self._opaque(child)

    def finish(self) -> None:
        # Directory mtimes last: creating their children changed them.
        for path, mtime in reversed(self._dir_times):
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _listdir(path: str) -> Iterator[str]:
    try:
        yield from os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return


def apply_layers(root: Path, layers: list[tuple[Path, str, str, str]], limits: Limits,
                 cancel: threading.Event | None = None) -> list[LayerStats]:
    """Apply (blob, compression, diff_id, name) layers in order onto `root`."""
    return [apply_layer(root, blob, comp, diff_id, limits, what, cancel)
            for blob, comp, diff_id, what in layers]

