"""A container's stdout/stderr as one offset-addressed, bounded log (ReadStdio), fed by the
agent reading the container's pipes on its event loop.

Offsets count bytes of both streams in arrival order, from 0, for the container's life. The log
keeps at most `limit` bytes: when the host falls behind, the oldest bytes are dropped (the
container never blocks on output) and a reader asking for a dropped offset gets the oldest byte
still kept, so the gap is visible. A read at offset N acknowledges everything before N.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable

DEFAULT_LIMIT = 4 * 1024 * 1024
STDOUT = 0
STDERR = 1
_READ_SIZE = 65536


class Chunk:
    __slots__ = ("data", "offset", "stream", "time_ns")

    def __init__(self, offset: int, stream: int, data: bytes, time_ns: int) -> None:
        self.offset = offset
        self.stream = stream
        self.data = data
        self.time_ns = time_ns

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


class OutputLog:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = max(limit, 1)
        self._chunks: deque[Chunk] = deque()
        self.start = 0  # first offset still kept
        self.end = 0  # offset of the next byte
        self.dropped = 0  # bytes lost because the host fell behind
        self.eof = False
        self._changed = asyncio.Event()

    @property
    def kept(self) -> int:
        return self.end - self.start

    def append(self, stream: int, data: bytes, time_ns: int | None = None) -> None:
        if not data or self.eof:
            return
        self._chunks.append(Chunk(self.end, stream, data, time_ns or time.time_ns()))
        self.end += len(data)
        self._trim_to(self.end - self.limit, lost=True)
        self._notify()

    def ack(self, offset: int) -> None:
        """The host has everything before `offset`: free it."""
        self._trim_to(min(offset, self.end), lost=False)

    def _trim_to(self, offset: int, lost: bool) -> None:
        if offset <= self.start:
            return
        if lost:
            self.dropped += offset - self.start
        while self._chunks and self._chunks[0].end <= offset:
            self._chunks.popleft()
        if self._chunks and self._chunks[0].offset < offset:
            first = self._chunks[0]
            cut = offset - first.offset
            self._chunks[0] = Chunk(offset, first.stream, first.data[cut:], first.time_ns)
        self.start = offset

    def read(self, offset: int, max_bytes: int = _READ_SIZE) -> list[Chunk]:
        """Kept chunks from `offset` on (from `start` if that is later), about max_bytes."""
        offset = max(offset, self.start)
        out: list[Chunk] = []
        size = 0
        for c in self._chunks:
            if c.end <= offset:
                continue
            if c.offset < offset:
                c = Chunk(offset, c.stream, c.data[offset - c.offset:], c.time_ns)
            out.append(c)
            size += len(c.data)
            if size >= max_bytes:
                break
        return out

    def close(self) -> None:
        self.eof = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_eof(self) -> None:
        while not self.eof:
            await self._changed.wait()

    async def wait_beyond(self, offset: int) -> None:
        """Return once there is data at or after `offset`, or EOF."""
        while self.end <= offset and not self.eof:
            await self._changed.wait()


class PipeReader:
    """Reads one pipe on the event loop into an OutputLog until EOF."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, stream: int, log: OutputLog,
                 on_eof: Callable[[], None]) -> None:
        self._loop = loop
        self._fd = fd
        self._stream = stream
        self._log = log
        self._on_eof = on_eof
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    @property
    def open(self) -> bool:
        return self._fd >= 0

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._log.append(self._stream, data)
        else:
            self.close()

    def drain(self) -> None:
        """Read what the pipe holds now (used before giving up on a writer that lingers)."""
        while self._fd >= 0:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except (BlockingIOError, OSError):
                return
            if not data:
                self.close()
                return
            self._log.append(self._stream, data)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._on_eof()
