"""Child processes for hot paths: started with vfork (Python's subprocess) and watched through a
pidfd on the event loop.

uvloop's own spawn forks the whole daemon: ~4 ms with its ~150 MB mapped, against ~0.4 ms for a
vfork (measured on this host). That is most of the daemon's share of an ExecSync through
`runc exec` (~9 ms). The child's pipes become asyncio streams, so callers use it as they use
asyncio.subprocess.Process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

import uvloop

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL


class Child:
    """A started child: `stdin` (a StreamWriter), `stdout`, `stderr` (StreamReaders) for the
    streams asked as PIPE."""

    def __init__(self, popen: subprocess.Popen[bytes], stdin: asyncio.StreamWriter | None,
                 stdout: asyncio.StreamReader | None, stderr: asyncio.StreamReader | None
                 ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd = os.pidfd_open(popen.pid)
        self._exited: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Its exit status (as Popen's returncode: -N when killed by signal N)."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        loop = asyncio.get_running_loop()
        if self._exited is None:
            self._exited = loop.create_future()
            loop.add_reader(self._pidfd, self._reap)
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        loop = asyncio.get_event_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if self.stdin is not None:
            self.stdin.close()  # nobody reads it any more (and uvloop would keep its fd)
        code = self._popen.wait()  # readable pidfd: it has exited, this does not block
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)

    def send_signal(self, signum: int) -> None:
        if self._popen.returncode is None:
            try:
                self._popen.send_signal(signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self._popen.returncode is None:
            try:
                self._popen.kill()
            except ProcessLookupError:
                pass

    async def communicate(self) -> tuple[bytes, bytes]:
        """Read stdout and stderr to their end and wait for the exit."""
        out, err, _ = await asyncio.gather(_read(self.stdout), _read(self.stderr), self.wait())
        return out, err


async def _read(reader: asyncio.StreamReader | None) -> bytes:
    return await reader.read() if reader is not None else b""


async def spawn(argv: Sequence[str], *, stdin: int = DEVNULL, stdout: int = DEVNULL,
                stderr: int = DEVNULL, pass_fds: Sequence[int] = (),
                env: Mapping[str, str] | None = None, cwd: str | None = None) -> Child:
    """Start `argv`: each stream PIPE, DEVNULL, STDOUT (stderr only) or a file descriptor of
    ours; `pass_fds` stay open in the child (every other fd is closed).

    :raises OSError: it cannot be started.
    """
    # Blocks only until the child has exec'd (vfork): ~0.4 ms, less than a thread hop.
    popen = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout,  # noqa: ASYNC220
                             stderr=stderr, close_fds=True, pass_fds=tuple(pass_fds),
                             env=env, cwd=cwd)
    loop = asyncio.get_running_loop()
    writer = None
    if popen.stdin is not None:
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(), _owned_by_transport(loop, popen.stdin))
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Child(popen, writer, await _reader(loop, popen.stdout),
                 await _reader(loop, popen.stderr))


class _PipeReader(asyncio.StreamReaderProtocol):
    """Closes its pipe at end of file. asyncio's pipe transport does that itself; uvloop's
    keeps the fd open until the transport is garbage-collected, which under load is whenever
    the cyclic collector next runs: a daemon spawning CNI plugins and runc grew by two fds per
    child in between."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._pipe = transport
        super().connection_made(transport)

    def eof_received(self) -> bool:
        super().eof_received()
        self._pipe.close()
        return False


async def _reader(loop: asyncio.AbstractEventLoop, pipe: IO[bytes] | None
                  ) -> asyncio.StreamReader | None:
    if pipe is None:
        return None
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: _PipeReader(reader), _owned_by_transport(loop, pipe))
    return reader


def _owned_by_transport(loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> IO[bytes]:
    """The file object to hand a pipe transport, so that exactly one close ends the pipe.

    asyncio's transport closes the file object it is given. uvloop's closes the fd through libuv,
    then closes the file object as well: a second close(2) of a number that another thread may
    have just been given by open(2) (seen as EBADF in a CNI result write). Under uvloop the
    transport gets a duplicate that its file object does not own; Popen's pipe is closed here.
    """
    if not isinstance(loop, uvloop.Loop):
        return pipe
    fd = os.dup(pipe.fileno())
    mode = "wb" if pipe.writable() else "rb"
    pipe.close()
    return open(fd, mode, buffering=0, closefd=False)
