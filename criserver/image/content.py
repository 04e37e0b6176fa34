"""The content store: verified blobs by sha256 under `<root>/image/blobs/sha256/<hex>`.

A blob becomes visible only after its size and digest matched: it is written to a temp file in
the same directory, fsynced and renamed. Hashing and disk writes run in worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from criserver.errors import Internal

log = logging.getLogger(__name__)
T = TypeVar("T")
# Blob writes and hashing: a pool of its own, so a big pull never starves other thread work.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="criserver-blob")

TMP_PREFIX = ".tmp-"
# Bytes gathered before one hand-off to a worker thread: fewer, larger thread hops.
FLUSH_BYTES = 1024 * 1024


class BlobMismatch(Internal):
    """A blob's size or digest is not the one its descriptor promised."""


class ContentStore:
    """Blobs by digest. Keeps the set of committed digests in memory (loaded by `start`)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self._sizes: dict[str, int] = {}

    async def start(self) -> None:
        """Create the directory, delete temp files left by a crash, index committed blobs."""
        self._sizes = await asyncio.to_thread(self._scan)
        log.info("content store ready dir=%s blobs=%d", self.dir, len(self._sizes))

    def _scan(self) -> dict[str, int]:
        self.dir.mkdir(parents=True, exist_ok=True)
        sizes = {}
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    log.info("removing leftover temp blob path=%s", entry.path)
                    os.unlink(entry.path)
                elif len(entry.name) == 64:
                    sizes[f"sha256:{entry.name}"] = entry.stat().st_size
        return sizes

    def path(self, digest: str) -> Path:
        return self.dir / digest.removeprefix("sha256:")

    def has(self, digest: str, size: int | None = None) -> bool:
        have = self._sizes.get(digest)
        return have is not None and (size is None or have == size)

    def size(self, digest: str) -> int:
        return self._sizes.get(digest, 0)

    def digests(self) -> set[str]:
        return set(self._sizes)

    def writer(self, digest: str, size: int) -> BlobWriter:
        """A writer for one blob; use as `async with store.writer(d, n) as w:` then `commit()`."""
        return BlobWriter(self, digest, size)

    async def put(self, digest: str, data: bytes) -> None:
        """Store a small blob held in memory (manifests, configs) after verifying it."""
        if self.has(digest, len(data)):
            return
        async with self.writer(digest, len(data)) as w:
            await w.write(data)
            await w.commit()

    async def read(self, digest: str) -> bytes:
        return await asyncio.to_thread(self.path(digest).read_bytes)

    async def delete(self, digests: set[str]) -> int:
        """Delete these blobs; returns the bytes freed."""
        freed = 0
        for digest in digests:
            freed += self._sizes.pop(digest, 0)
        await asyncio.to_thread(self._unlink_all, [self.path(d) for d in digests])
        return freed

    @staticmethod
    def _unlink_all(paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def _committed(self, digest: str, size: int) -> None:
        self._sizes[digest] = size


class BlobWriter:
    """Streams one blob into a temp file while hashing it; `commit` verifies and publishes.

    Leaving the `async with` block without a commit (error, cancellation) deletes the temp file,
    so a failed or cancelled download leaves nothing visible.
    """

    def __init__(self, store: ContentStore, digest: str, size: int) -> None:
        self.store = store
        self.digest = digest
        self.expected = size
        self.written = 0
        self._hash = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd = -1
        self._tmp = store.dir / f"{TMP_PREFIX}{digest.removeprefix('sha256:')[:16]}-" \
                                f"{secrets.token_hex(4)}"
        self._published = False
        self._committed_ok = False
        self._inflight: concurrent.futures.Future[Any] | None = None

    async def __aenter__(self) -> BlobWriter:
        try:
            await self._io(self._open)
        except BaseException:
            await self._cleanup()
            raise
        return self

    def _open(self) -> None:
        # Sets _fd in the thread itself, so a cancelled caller cannot lose the descriptor.
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._cleanup()

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking file work in the blob pool. The concurrent future is kept: after a
        cancellation the thread still runs, and clean-up must wait for it (fd reuse)."""
        self._inflight = _POOL.submit(fn, *args)
        return await asyncio.wrap_future(self._inflight)

    async def _cleanup(self) -> None:
        """Remove the temp file unless committed. Runs to the end even when cancelled."""
        async def settle() -> None:
            if self._inflight is not None and not self._inflight.done():
                await asyncio.wait([asyncio.wrap_future(self._inflight)])
            if self._published:
                # Renamed into place by a commit whose caller was cancelled: verified, keep it.
                if not self._committed_ok:
                    self.store._committed(self.digest, self.expected)
                return
            await asyncio.wrap_future(_POOL.submit(self._discard))

        task = asyncio.ensure_future(settle())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            raise

    async def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.expected:
            raise BlobMismatch(
                f"blob {self.digest}: more than the expected {self.expected} bytes received"
            )
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= FLUSH_BYTES:
            await self._flush()

    async def reset(self) -> None:
        """Start over (a retried download): drop what was written so far."""
        self._buffer.clear()
        self._buffered = 0
        self.written = 0
        self._hash = hashlib.sha256()
        await self._io(os.ftruncate, self._fd, 0)
        await self._io(os.lseek, self._fd, 0, os.SEEK_SET)

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        await self._io(self._write_and_hash, data)

    def _write_and_hash(self, data: bytes) -> None:
        # hashlib releases the GIL on large buffers, so this overlaps with the event loop.
        self._hash.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    async def commit(self) -> None:
        """Verify size and digest, then fsync and rename into place.

        :raises BlobMismatch: wrong size or digest (the temp file is removed on exit).
        """
        await self._flush()
        if self.written != self.expected:
            raise BlobMismatch(
                f"blob {self.digest}: got {self.written} bytes, expected {self.expected}"
            )
        actual = f"sha256:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise BlobMismatch(f"blob {self.digest}: content has digest {actual}")
        await self._io(self._publish)
        self.store._committed(self.digest, self.expected)
        self._committed_ok = True

    def _publish(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self._tmp, self.store.path(self.digest))
        dir_fd = os.open(self.store.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._published = True

    def _discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)
