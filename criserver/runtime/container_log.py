"""The CRI container log file: stdout/stderr bytes turned into kubelet's line format.

Each record is `<RFC3339Nano UTC> <stdout|stderr> <P|F> <content>\\n`: "F" ends a line, "P" is a
piece of a longer one (split at `max_line` bytes, or cut by the end of the stream). File I/O runs
in a thread; records produced while a write is in flight are batched into the next one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

from criserver.errors import FailedPrecondition, Internal, InvalidArgument, out_of_space

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")
MAX_LINE = 16 * 1024  # containerd's default max_container_log_line_size
FILE_MODE = 0o640


def format_timestamp(time_ns: int) -> str:
    """RFC 3339 in UTC with all nine fractional digits, e.g. 2016-10-06T00:17:09.669794202Z."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


class _Partial:
    """Bytes of one stream's unfinished line, and when they last arrived."""

    __slots__ = ("data", "time_ns")

    def __init__(self) -> None:
        self.data = bytearray()
        self.time_ns = 0


class ContainerLog:
    """One container's CRI log file. Writers await `write`; `close` ends every partial line."""

    def __init__(self, path: str, max_line: int = MAX_LINE, container_id: str = "") -> None:
        self.path = path
        self.max_line = max_line if max_line > 0 else 0  # 0: lines are never split
        self.container_id = container_id
        self._fd: int | None = None
        self._closed = False
        self._partial = {stream: _Partial() for stream in STREAMS}
        self._pending = bytearray()  # formatted records not yet handed to the file
        self._lock = asyncio.Lock()  # one file operation at a time, in order
        self.lost_bytes = 0  # records dropped because the log's filesystem was full
        self._losing = False  # the last write found the filesystem full

    async def open(self) -> None:
        """Create the file (and its directory) if needed; `write` also does it on first use."""
        async with self._lock:
            if self._closed:
                raise FailedPrecondition(f"log {self.path} is closed")
            if self._fd is None:
                self._fd = await asyncio.to_thread(self._open_file)

    async def write(self, stream: str, data: bytes, time_ns: int | None = None) -> None:
        """Log `data` from `stream`; `time_ns` (default now) stamps the lines it completes."""
        if stream not in self._partial:
            raise InvalidArgument(f"unknown log stream {stream!r}")
        if self._closed:
            raise FailedPrecondition(f"log {self.path} is closed")
        if data:
            self._pending += self._records(stream, data, time_ns or time.time_ns())
        await self._drain()

    @property
    def has_partial(self) -> bool:
        """Whether a stream holds the start of a line not yet in the file."""
        return any(p.data for p in self._partial.values())

    async def reopen(self) -> None:
        """Start a new file at `path` (kubelet renamed the old one to rotate it)."""
        async with self._lock:
            if self._closed:
                raise FailedPrecondition(f"log {self.path} is closed")
            # What was produced before the rotation belongs to the old file.
            await self._write_pending()
            old, self._fd = self._fd, None
            if old is not None:
                await asyncio.to_thread(os.close, old)
            self._fd = await asyncio.to_thread(self._open_file)
        log.info("container log reopened container=%s path=%s", self.container_id, self.path)

    async def close(self) -> None:
        """Write each stream's unfinished line as a "P" record, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tail = sorted((p.time_ns, s) for s, p in self._partial.items() if p.data)
        for time_ns, stream in tail:
            partial = self._partial[stream]
            self._pending += self._record(stream, b"P", bytes(partial.data), time_ns)
            partial.data.clear()
        async with self._lock:
            try:
                if self._pending:
                    await self._write_pending()
            finally:
                fd, self._fd = self._fd, None
                if fd is not None:
                    await asyncio.to_thread(os.close, fd)

    def _records(self, stream: str, data: bytes, time_ns: int) -> bytearray:
        out = bytearray()
        partial = self._partial[stream]
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if partial.data:
                partial.data += data[start:end]
                line = bytes(partial.data)
                partial.data.clear()
            else:
                line = data[start:end]
            out += self._line(stream, line, time_ns)
            start = end + 1
        if start < len(data):
            partial.data += data[start:]
            partial.time_ns = time_ns
            # A line longer than the limit is cut now rather than held in memory until its end.
            limit = self.max_line
            if limit and len(partial.data) > limit:
                cut = (len(partial.data) - 1) // limit * limit  # keep 1..limit bytes back
                for i in range(0, cut, limit):
                    out += self._record(stream, b"P", partial.data[i:i + limit], time_ns)
                del partial.data[:cut]
        return out

    def _line(self, stream: str, line: bytes, time_ns: int) -> bytes:
        limit = self.max_line
        if not limit or len(line) <= limit:
            return self._record(stream, b"F", line, time_ns)
        pieces = [line[i:i + limit] for i in range(0, len(line), limit)]
        return b"".join(
            [*(self._record(stream, b"P", p, time_ns) for p in pieces[:-1]),
             self._record(stream, b"F", pieces[-1], time_ns)]
        )

    @staticmethod
    def _record(stream: str, tag: bytes, content: bytes | bytearray, time_ns: int) -> bytes:
        head = f"{format_timestamp(time_ns)} {stream} ".encode()
        return b"".join((head, tag, b" ", content, b"\n"))

    async def _drain(self) -> None:
        async with self._lock:
            if self._closed and self._fd is None:
                return  # close() wrote everything while this writer waited for the lock
            if self._fd is None:
                # Created at the first write even without a whole line: kubelet reads the file
                # as soon as the container runs.
                self._fd = await asyncio.to_thread(self._open_file)
            await self._write_pending()

    async def _write_pending(self) -> None:
        # Caller holds the lock. Loop: records may arrive while the thread writes.
        while self._pending:
            if self._fd is None:
                self._fd = await asyncio.to_thread(self._open_file)
            chunk = bytes(self._pending)
            self._pending.clear()
            try:
                await asyncio.to_thread(_write_records, self._fd, chunk)
            except OSError as exc:
                if not out_of_space(exc):
                    raise
                # The filesystem is full: these records are dropped (as ctrmon drops them for
                # runc containers), the container is never held up, and logging resumes by
                # itself once there is space again. One warning per episode, not per write.
                self.lost_bytes += len(chunk)
                if not self._losing:
                    self._losing = True
                    log.warning("container log full, output dropped until there is space "
                                "container=%s path=%s error=%s", self.container_id, self.path,
                                exc.strerror)
                continue
            if self._losing:
                self._losing = False
                log.warning("container log writable again container=%s path=%s "
                            "lost_bytes=%d", self.container_id, self.path, self.lost_bytes)

    def _open_file(self) -> int:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            # O_NOFOLLOW: a symlink put where the log goes would have the daemon append to
            # whatever file it names.
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                           | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FailedPrecondition(
                    f"container log {self.path} is a symbolic link: not followed") from exc
            raise Internal(f"cannot open container log {self.path}: {exc.strerror}") from exc


def check_inside(path: str, directory: str) -> None:
    """That the log file `path` lands inside the pod's log `directory` once the symlinks
    already on its way are followed (a directory swapped for a link to /etc, say). Blocking:
    it reads the file system.

    :raises FailedPrecondition: it does not.
    """
    root = os.path.realpath(directory)
    parent = os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([root, parent]) != root:
        raise FailedPrecondition(
            f"container log {path} leaves the pod's log directory {directory} through a "
            f"symbolic link (it resolves into {parent})")


def _write_records(fd: int, data: bytes) -> None:
    """Append whole records: a write that fails part-way (a full disk) is cut back to where it
    started, so the file never holds half a line that the next record would run into."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        if len(view) != len(data):
            try:
                os.ftruncate(fd, start)
            except OSError as exc:  # the record stays cut: say so, the caller drops the rest
                log.warning("container log: cannot remove a partly written record fd=%d "
                            "error=%s", fd, exc.strerror)
        raise

