"""The daemon's side of `ctrmon`, the per-container monitor (ctrmon.c; design 1.5, 2 and 3.2).

`launch` starts one and waits for runc create's outcome; `Monitor` watches it (a pidfd: the
monitor is not our child), asks it to reopen the log, resize the tty, close stdin, or attach;
`read_exit` reads the exit record it leaves in the bundle, which is all a restarted daemon needs.

ctrmon's contract, which monitors started by an older daemon keep (protocol 1):
  ctrmon create --runc PATH --root DIR --bundle DIR --id ID --log PATH [--tty] [--stdin]
                [--stdin-once] [--kill-all] [--runc-arg ARG]... [--sync-fd N]
  - the sync fd (default 3) gets one JSON line: {"pid": N} once runc create succeeded, else
    {"error": "runc create failed", "status": N} (runc's message is in BUNDLE/runc.log) or
    {"error": "<what failed>"}; ctrmon's own diagnostics go to BUNDLE/ctrmon.log.
  - BUNDLE/ctrmon.pid: the monitor's pid; BUNDLE/init.pid: the container's (runc --pid-file).
  - BUNDLE/ctl, SOCK_SEQPACKET, one datagram per message: "reopen", "resize R C", "close-stdin",
    "attach 0|1" (then frames: out [1 stdout|2 stderr][data]; in [0][stdin], [3] done with
    stdin, [4]"R C" resize). Replies "ok" or "error <text>".
  - BUNDLE/exit, written after the log is closed: {"exit_code": C, "signal": S,
    "finished_at": NS}, C = 128 + S when killed by signal S.
This module writes BUNDLE/ctrmon.start (the monitor's start time) so that `adopt` never takes
another process that got the same pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from criserver import spawn
from criserver.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_CTRMON = "/usr/local/lib/criserver/ctrmon"
PROTOCOL = 1
LOST_EXIT = 255  # exit_codes.LOST: nobody can tell how it ended

# Frame tags of an attach stream (ctrmon.c).
STDIN, STDOUT, STDERR, CLOSE_STDIN, RESIZE = 0, 1, 2, 3, 4
FRAME_MAX = 32 * 1024  # what ctrmon sends at most per frame; stdin is cut the same way
_RECV_SIZE = 64 * 1024 + 1
_CTL_TIMEOUT = 10.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus its NUL

# Names in the bundle.
PID_FILE = "ctrmon.pid"
START_FILE = "ctrmon.start"
INIT_PID_FILE = "init.pid"
EXIT_FILE = "exit"
CTL_SOCKET = "ctl"
RUNC_LOG = "runc.log"
DIAG_LOG = "ctrmon.log"


@dataclass(frozen=True)
class ExitRecord:
    exit_code: int
    signal: int
    finished_at: int  # ns since the epoch


def read_exit(bundle: Path) -> ExitRecord | None:
    """The exit record ctrmon left, None when there is none (yet); a corrupt one reads as LOST."""
    path = bundle / EXIT_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return ExitRecord(int(data["exit_code"]), int(data["signal"]), int(data["finished_at"]))
    except (ValueError, KeyError, TypeError):
        log.warning("corrupt exit record path=%s content=%r", path, text[:200])
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = time.time_ns()
        return ExitRecord(LOST_EXIT, 0, mtime)


async def check_ctrmon(binary: str = DEFAULT_CTRMON) -> str:
    """`binary --version` ("ctrmon 1"); raises FailedPrecondition saying how to get one."""
    hint = (
        "build and install it with `make ctrmon`"
        f" (or python -m criserver.backends.runc.build {binary})"
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
    except OSError as exc:
        raise FailedPrecondition(f"container monitor {binary}: {exc.strerror}: {hint}") from exc
    version = out.decode(errors="replace").strip()
    if proc.returncode != 0 or version != f"ctrmon {PROTOCOL}":
        raise FailedPrecondition(
            f"container monitor {binary} says {version!r}, want 'ctrmon {PROTOCOL}': {hint}"
        )
    return version


async def launch(
    binary: str,
    *,
    runc: str,
    runc_root: Path,
    bundle: Path,
    container_id: str,
    log_path: str,
    tty: bool = False,
    stdin: bool = False,
    stdin_once: bool = False,
    kill_all: bool = False,
    runc_args: Sequence[str] = (),
) -> Monitor:
    """Start a ctrmon for a container whose bundle is ready; returns once runc create is done.

    :raises FailedPrecondition: runc create failed (with runc's own message) or the monitor could
        not set up; InvalidArgument when runc calls the spec invalid. Nothing is left running then
        except what runc created, which `runc delete --force` removes.
    """
    argv = [
        binary, "create", "--runc", runc, "--root", str(runc_root), "--bundle", str(bundle),
        "--id", container_id, "--log", log_path,
    ]
    argv += [flag for flag, on in (
        ("--tty", tty), ("--stdin", stdin), ("--stdin-once", stdin_once), ("--kill-all", kill_all)
    ) if on]
    for arg in runc_args:
        argv += ["--runc-arg", arg]
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        argv += ["--sync-fd", str(write_fd)]
        try:
            proc = await spawn.spawn(argv, pass_fds=(write_fd,))
        except OSError as exc:
            raise FailedPrecondition(f"cannot start container monitor {binary}: {exc}") from exc
        os.close(write_fd)
        write_fd = -1
        message = await _read_to_eof(read_fd)
        await proc.wait()  # the first fork: it exits at once
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    try:
        reply = json.loads(message)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        reply = {}
    if "pid" not in reply:
        raise await asyncio.to_thread(_launch_error, bundle, container_id, reply, message)
    monitor = await asyncio.to_thread(Monitor._launched, bundle, int(reply["pid"]))
    log.info(
        "container monitor started container=%s monitor_pid=%s pid=%s",
        container_id, monitor.pid, monitor.container_pid,
    )
    return monitor


class Monitor:
    """One running ctrmon, found by its bundle. Not our child: watched through a pidfd."""

    def __init__(self, bundle: Path, pid: int, container_pid: int, pidfd: int | None) -> None:
        self.bundle = bundle
        self.pid = pid  # ctrmon's
        self.container_pid = container_pid
        self.lost = False  # it ended without an exit record (killed): its exit is LOST_EXIT
        self._pidfd = pidfd  # None: the monitor had already ended when we looked
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.Task[ExitRecord] | None = None

    @classmethod
    def _launched(cls, bundle: Path, container_pid: int) -> Monitor:
        # Runs in a thread right after the sync message: ctrmon is alive unless the container
        # already ended, in which case its exit record is (about to be) there.
        pid = int((bundle / PID_FILE).read_text())
        pidfd = _pidfd_open(pid)
        start = _start_time(pid) if pidfd is not None else None
        if start is not None:
            tmp = bundle / (START_FILE + ".tmp")
            tmp.write_text(f"{start}\n")
            tmp.rename(bundle / START_FILE)
        return cls(bundle, pid, container_pid, pidfd)

    @classmethod
    def adopt(cls, bundle: Path) -> Monitor | None:
        """The monitor of `bundle` if it still runs (daemon restart), else None.

        Blocking file reads: call it in a thread from async code.
        """
        try:
            pid = int((bundle / PID_FILE).read_text())
            recorded = int((bundle / START_FILE).read_text())
            container_pid = int((bundle / INIT_PID_FILE).read_text())
        except (OSError, ValueError):
            return None
        if _start_time(pid) != recorded:
            return None
        pidfd = _pidfd_open(pid)
        # Checked again with the pidfd held: the pid cannot be reused while it is open.
        if pidfd is None or _start_time(pid) != recorded:
            if pidfd is not None:
                os.close(pidfd)
            return None
        return cls(bundle, pid, container_pid, pidfd)

    async def wait(self) -> ExitRecord:
        """Until the monitor exits; its exit record, or LOST (255) if it died without one.

        Any number of callers may wait, and one giving up (a timeout) stops no other.
        """
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(
                self._watch_exit(), name=f"ctrmon-{self.pid}"
            )
        return await asyncio.shield(self._watch)

    def close(self) -> None:
        """Stop watching (the monitor keeps running); pending `wait`s are cancelled."""
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
        self._unwatch()

    async def _watch_exit(self) -> ExitRecord:
        if self._pidfd is not None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._pidfd, _set_once, exited)
            self._reader_loop = loop
            try:
                await exited  # a pidfd is readable once its process has exited
            finally:
                self._unwatch()
        record = await asyncio.to_thread(read_exit, self.bundle)
        if record is None:
            log.warning("container monitor died without an exit record bundle=%s", self.bundle)
            self.lost = True
            record = ExitRecord(LOST_EXIT, 0, time.time_ns())
        return record

    def _unwatch(self) -> None:
        # The reader goes before the fd: a reused fd number must not lose its own reader.
        if self._reader_loop is not None and self._pidfd is not None:
            self._reader_loop.remove_reader(self._pidfd)
        self._reader_loop = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def reopen_log(self) -> None:
        """Ask for a new log file at the same path (kubelet renamed the old one)."""
        await self._request(b"reopen")

    async def resize(self, rows: int, cols: int) -> None:
        await self._request(f"resize {rows} {cols}".encode())

    async def close_stdin(self) -> None:
        await self._request(b"close-stdin")

    async def attach(self, stdin: bool) -> AttachStream:
        sock = await self._connect()
        try:
            await self._exchange(sock, b"attach 1" if stdin else b"attach 0")
        except BaseException:
            sock.close()
            raise
        return AttachStream(sock)

    async def _request(self, message: bytes) -> None:
        sock = await self._connect()
        with sock:
            await self._exchange(sock, message)

    async def _exchange(self, sock: socket.socket, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_CTL_TIMEOUT):
                await loop.sock_sendall(sock, message)
                reply = await loop.sock_recv(sock, 4096)
        except (OSError, TimeoutError) as exc:
            raise FailedPrecondition(f"container monitor {self.bundle}: {exc}") from exc
        if reply != b"ok":
            text = reply.decode(errors="replace").removeprefix("error ")
            raise FailedPrecondition(
                f"container monitor {self.bundle}: {message.decode()}: {text or 'no answer'}"
            )

    async def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        path = str(self.bundle / CTL_SOCKET)
        dirfd = -1
        try:
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                # Too long for sockaddr_un: reach it through the bundle directory's fd.
                dirfd = os.open(self.bundle, os.O_PATH | os.O_CLOEXEC)
                path = f"/proc/self/fd/{dirfd}/{CTL_SOCKET}"
            await asyncio.get_running_loop().sock_connect(sock, path)
        except OSError as exc:
            sock.close()
            raise FailedPrecondition(
                f"container monitor {self.bundle} unreachable: {exc.strerror or exc}"
            ) from exc
        finally:
            if dirfd >= 0:
                os.close(dirfd)
        return sock


class AttachStream:
    """One attach session on a monitor: output frames in, stdin and resizes out."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """(STDOUT or STDERR, data) until the container has exited and its output is sent."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await loop.sock_recv(self._sock, _RECV_SIZE)
            except OSError:
                return
            if not frame:
                return
            yield frame[0], frame[1:]

    async def send_stdin(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for i in range(0, len(data), FRAME_MAX):
            await loop.sock_sendall(self._sock, bytes([STDIN]) + data[i:i + FRAME_MAX])

    async def close_stdin(self) -> None:
        """This client is done with stdin (with stdin_once the container's stdin closes)."""
        await asyncio.get_running_loop().sock_sendall(self._sock, bytes([CLOSE_STDIN]))

    async def resize(self, rows: int, cols: int) -> None:
        await asyncio.get_running_loop().sock_sendall(
            self._sock, bytes([RESIZE]) + f"{rows} {cols}".encode()
        )

    def close(self) -> None:
        self._sock.close()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _launch_error(
    bundle: Path, container_id: str, reply: dict[str, object], message: bytes
) -> FailedPrecondition | InvalidArgument:
    error = reply.get("error")
    if error is None:
        diag = _tail(bundle / DIAG_LOG)
        return FailedPrecondition(
            f"container monitor for {container_id} ended without reporting"
            f" ({message[:200]!r}): {diag or 'no diagnostics'}"
        )
    if error != "runc create failed":
        return FailedPrecondition(f"container monitor for {container_id}: {error}")
    text = runc_error(bundle / RUNC_LOG) or f"runc create exited {reply.get('status')}"
    exc_type = InvalidArgument if re.search(r"\binvalid\b", text) else FailedPrecondition
    return exc_type(f"runc create {container_id}: {text}")


def runc_error(runc_log: Path) -> str:
    """The last error runc wrote to its JSON log (lines with "level" and "msg"), or ""."""
    try:
        lines = runc_log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for raw in reversed(lines):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            return str(entry.get("msg", ""))
    return ""


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-1000:]
    except OSError:
        return ""


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start, in clock ticks since boot) of a live process, or None.

    A zombie counts as gone: it has exited, only its parent has not reaped it yet.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


async def _read_to_eof(fd: int) -> bytes:
    """All a pipe gives until every writer closed it, without blocking the loop."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    data = bytearray()
    readable: asyncio.Event = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            with contextlib.suppress(BlockingIOError):
                chunk = os.read(fd, 4096)
                if not chunk:
                    return bytes(data)
                data += chunk
    finally:
        loop.remove_reader(fd)
