"""ExecSync in the guest itself: run a process to completion with a timeout and per-stream
output caps. Exit statuses come from the PID-1 reaper (the only waitpid caller in the agent).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.pid1 import ChildExit, Reaper

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024  # the CRI's cap on ExecSync output
# After the process exits, grandchildren may still hold its stdout open: read what they write
# for this long, then answer anyway.
_DRAIN_AFTER_EXIT = 0.5
_DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


class Capture:
    """Reads one pipe into a buffer of at most `limit` bytes; keeps draining past the limit so
    the writer never blocks on a full pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, limit: int) -> None:
        self._loop = loop
        self._fd = fd
        self._limit = limit
        self.data = bytearray()
        self.truncated = False
        self.eof: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.close()
            return
        room = self._limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        if len(chunk) > room:
            self.truncated = True

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if not self.eof.done():
            self.eof.set_result(None)


def _spawn(process: pb.Process, out_w: int, err_w: int) -> int:
    import subprocess  # lazy: only ExecSync needs it

    env = dict(e.split("=", 1) for e in process.env if "=" in e) or dict(_DEFAULT_ENV)
    user = process.user if process.HasField("user") else None
    # fork/exec only: the wait is async, through the reaper.
    proc = subprocess.Popen(
        list(process.argv), stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
        cwd=process.cwd or "/", env=env, start_new_session=True, close_fds=True,
        user=None if user is None else user.uid, group=None if user is None else user.gid,
        extra_groups=None if user is None else list(user.additional_gids),
    )
    # The reaper collects the status; tell Popen so it never waits for this pid itself.
    proc.returncode = 0
    pid: int = proc.pid
    return pid


async def exec_sync(req: pb.ExecSyncRequest, reaper: Reaper) -> pb.ExecSyncResponse:
    """ExecSync in the guest itself (req.container_id is empty)."""
    if not req.process.argv:
        raise GRPCError(Status.INVALID_ARGUMENT, "ExecSync: empty argv")
    loop = asyncio.get_running_loop()
    limit = req.output_limit_bytes or DEFAULT_OUTPUT_LIMIT
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = _spawn(req.process, out_w, err_w)
    except OSError as exc:
        for fd in (out_r, err_r):
            os.close(fd)
        code = {errno.ENOENT: Status.NOT_FOUND, errno.EACCES: Status.PERMISSION_DENIED}.get(
            exc.errno or 0, Status.INVALID_ARGUMENT)
        raise GRPCError(code, f"ExecSync {req.process.argv[0]!r}: {exc.strerror}") from exc
    finally:
        os.close(out_w)
        os.close(err_w)
    exited = reaper.watch(pid)
    stdout = Capture(loop, out_r, limit)
    stderr = Capture(loop, err_r, limit)
    timed_out = False
    try:
        try:
            status: ChildExit = await asyncio.wait_for(
                asyncio.shield(exited), req.timeout_seconds or None)
        except TimeoutError:
            timed_out = True
            _kill_group(pid)
            status = await exited
        await asyncio.wait({stdout.eof, stderr.eof}, timeout=_DRAIN_AFTER_EXIT)
    except asyncio.CancelledError:
        # The host gave up on the call (or the connection died): do not leave the process.
        _kill_group(pid)
        raise
    finally:
        stdout.close()
        stderr.close()
    return pb.ExecSyncResponse(
        stdout=bytes(stdout.data), stderr=bytes(stderr.data), exit_code=status.code,
        signal=status.signal, timed_out=timed_out, stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_pid(pid: int, signum: int = signal.SIGKILL) -> None:
    if pid <= 0:  # 0 or -1 would signal our own process group, or everything
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
