"""Non-blocking fd I/O on the agent's event loop for the interactive streams: read one chunk
when the fd is readable (so a slow reader upstream leaves the data in the kernel pipe: that is
the back-pressure), write everything, and the terminal helpers (window size, pty pairs).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import termios

CHUNK = 65536


async def _ready(fd: int, writer: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    add, remove = (loop.add_writer, loop.remove_writer) if writer else (
        loop.add_reader, loop.remove_reader)
    add(fd, wake)
    try:
        await fut
    finally:
        remove(fd)


async def read_chunk(fd: int, size: int = CHUNK) -> bytes:
    """The next bytes of a non-blocking fd; b"" at EOF (EIO from a pty master whose slaves are
    all closed counts as EOF)."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise
        await _ready(fd, writer=False)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data`, waiting while the pipe or pty is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, writer=True)
            continue
        view = view[n:]


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a pty (either end): the kernel sends SIGWINCH to the foreground group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441


def openpty_in(pid: int) -> tuple[int, int]:
    """A pty pair from the devpts instance mounted in `pid`'s container, so the process sees
    a terminal named in its own /dev/pts (`tty` works); os.openpty() when that fails."""
    try:
        master = os.open(f"/proc/{pid}/root/dev/pts/ptmx",
                         os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return os.openpty()
    try:
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        return os.openpty()
    return master, int(slave)


def close_quietly(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
