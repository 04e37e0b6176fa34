"""The runc backend's half of `kubectl exec/attach/port-forward` (design 3.1-3.3): exec runs
`runc exec` with the daemon's pipes (a tty exec through `ctrmon exec`, which holds the pty),
attach relays the container monitor's attach stream, and port-forward connects inside the pod's
network namespace and relays the socket. Every relay here is plain asyncio: nothing blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criserver import spawn
from criserver.backends.runc.monitor import STDERR, STDOUT, AttachStream, Monitor, runc_error
from criserver.backends.runc.runc import Runc, error_for
from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.network import netns
from criserver.runtime.streaming.interface import ByteSink, ByteSource, ResizeSource, TerminalSize
from criserver.runtime.streaming.session_tasks import SessionTasks
from vmagent.ocispec import exec_process

log = logging.getLogger(__name__)

CHUNK = 65536
# Output still held open after the exec'd process exited (a leftover child of it) is cut after
# this long without progress: the exec is over, the leftover must not hold the session.
DRAIN = 2.0
KILL_GRACE = 5.0  # for runc (or ctrmon exec) to end once the exec'd process was killed
CONNECT_TIMEOUT = 10.0
# How long a tty exec waits for the client's first window size, so the process starts with it
# (kubectl sends it as soon as its streams are open).
FIRST_SIZE_WAIT = 1.0
_DIAG_MAX = 4096


@dataclass(frozen=True)
class _ExecFiles:
    """The files of one exec in the container's bundle, removed when it ends."""

    bundle: Path
    name: str  # exec-<random>

    @property
    def process(self) -> Path:
        return self.bundle / f"{self.name}.json"

    @property
    def pid(self) -> Path:
        return self.bundle / f"{self.name}.pid"

    @property
    def runc_log(self) -> Path:
        return self.bundle / f"{self.name}.log"

    @property
    def console(self) -> str:  # a name in the bundle: ctrmon binds it there
        return f"{self.name}.sock"

    def remove(self) -> None:
        for path in (self.process, self.pid, self.runc_log, self.bundle / self.console):
            path.unlink(missing_ok=True)


class _Progress:
    """Output moving: reads done, and sink writes in flight (a slow client is not idle)."""

    def __init__(self) -> None:
        self.reads = 0
        self.writing = 0


async def exec_in_container(
    runc: Runc, monitor_binary: str, bundle: Path, container_id: str, spec: dict[str, Any],
    cmd: list[str], *, tty: bool, stdin: ByteSource | None, stdout: ByteSink | None,
    stderr: ByteSink | None, resize: ResizeSource | None,
) -> int:
    """Run `cmd` in the running container (its spec's process settings, as ExecSync), relay its
    stdio until it exited and its output is written; its exit code (128 + N: signal N).

    Cancelled (the client went away), it kills the exec'd process and returns once runc (or
    ctrmon) has ended.

    :raises InvalidArgument: no command.
    :raises CriError: runc could not run it (runc's message, see runc.error_for).
    """
    if not cmd:
        raise InvalidArgument("exec needs a command")
    process = exec_process(spec, cmd, [], "", None)
    files = _ExecFiles(bundle, f"exec-{os.urandom(4).hex()}")
    tasks = SessionTasks()
    try:
        if tty:
            code = await _exec_tty(runc, monitor_binary, files, container_id, process, tasks,
                                   stdin=stdin, stdout=stdout, resize=resize)
        else:
            code = await _exec_pipes(runc, files, container_id, process, tasks, stdin=stdin,
                                     stdout=stdout, stderr=stderr)
    finally:
        await tasks.close()
        await asyncio.to_thread(files.remove)
    log.info("exec exited container=%s exec=%s code=%d tty=%s", container_id, files.name, code,
             tty)
    return code


async def _exec_pipes(
    runc: Runc, files: _ExecFiles, container_id: str, process: dict[str, Any],
    tasks: SessionTasks, *, stdin: ByteSource | None, stdout: ByteSink | None,
    stderr: ByteSink | None,
) -> int:
    # runc runs in the foreground: the process is its child and runc exits with its status.
    await asyncio.to_thread(files.process.write_text, json.dumps(process))
    argv = runc.argv("--log", str(files.runc_log), "--log-format", "json", "exec",
                     "--process", str(files.process), "--pid-file", str(files.pid), container_id)
    pipe, devnull = spawn.PIPE, spawn.DEVNULL
    proc = await spawn.spawn(
        argv, stdin=pipe if stdin is not None else devnull,
        stdout=pipe if stdout is not None else devnull,
        stderr=pipe if stderr is not None else devnull)
    log.info("exec started container=%s exec=%s runc_pid=%d", container_id, files.name, proc.pid)
    progress = _Progress()
    outputs = [tasks.spawn(_copy_out(reader, sink, progress))
               for reader, sink in ((proc.stdout, stdout), (proc.stderr, stderr))
               if reader is not None and sink is not None]
    if stdin is not None and proc.stdin is not None:
        tasks.spawn(_copy_in(stdin, proc.stdin))
    try:
        await proc.wait()
    except BaseException:  # cancelled: the client went away
        await tasks.close()  # its sinks and sources are not ours any more
        await _kill_exec(proc, files.pid, container_id)
        raise
    code = _exit_code(proc.returncode)
    if code != 0 and not await asyncio.to_thread(files.pid.exists):
        # No pid file: runc failed before the process ran (its message is in the log).
        detail = await asyncio.to_thread(runc_error, files.runc_log)
        raise error_for(f"exec {process['args'][0]!r} in container {container_id}", code,
                        detail or "no message")
    await _drain(outputs, progress, container_id)
    return code


async def _copy_out(reader: asyncio.StreamReader, sink: ByteSink, progress: _Progress) -> None:
    while data := await reader.read(CHUNK):
        progress.reads += 1
        progress.writing += 1
        try:
            await sink.write(data)
        finally:
            progress.writing -= 1


async def _copy_in(source: ByteSource, writer: asyncio.StreamWriter) -> None:
    """Client input to the process; the client's half-close closes the process's stdin."""
    try:
        async for chunk in source:
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:  # the client went away, or the process closed its stdin
        return
    writer.close()


async def _drain(outputs: list[asyncio.Task[None]], progress: _Progress, what: str) -> None:
    """Until the output pipes reached EOF, or stopped moving for DRAIN seconds."""
    pending: set[asyncio.Task[None]] = set(outputs)
    while pending:
        seen = progress.reads
        done, pending = await asyncio.wait(pending, timeout=DRAIN)
        if pending and not done and progress.reads == seen and not progress.writing:
            log.info("exec output held open after exit, cut container=%s", what)
            return  # the caller cancels what is left


async def _kill_exec(proc: spawn.Child, pid_file: Path, what: str) -> None:
    """Kill the exec'd process (not runc: runc killed would leave it running), then reap runc."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KILL_GRACE
    while proc.returncode is None and loop.time() < deadline:
        pid = await asyncio.to_thread(_read_pid, pid_file)
        if pid is not None:  # not there yet: runc is still starting it
            await asyncio.to_thread(_kill_child, pid, proc.pid)
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except TimeoutError:
        log.warning("runc exec did not end after its process was killed container=%s", what)
        proc.kill()
        await proc.wait()
    log.info("exec cancelled, process killed container=%s", what)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # absent, or runc is writing it
        return None


def _kill_child(pid: int, parent: int) -> None:
    """SIGKILL `pid` if it still is `parent`'s child: the pidfd pins it (no reuse), the parent
    check makes sure it is the process runc started (runc's child, or ctrmon's once adopted)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _parent_of(pid) == parent:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _exit_code(returncode: int | None) -> int:
    code = returncode or 0
    return 128 - code if code < 0 else code


# -- tty exec: through `ctrmon exec` -----------------------------------------------------------


async def _exec_tty(
    runc: Runc, monitor_binary: str, files: _ExecFiles, container_id: str,
    process: dict[str, Any], tasks: SessionTasks, *, stdin: ByteSource | None,
    stdout: ByteSink | None, resize: ResizeSource | None,
) -> int:
    # runc takes a console socket only when it detaches: ctrmon runs it, holds the pty and
    # adopts the process (ctrmon.c, "exec"); we talk to ctrmon over three socketpairs.
    process["terminal"] = True
    sizes: asyncio.Queue[TerminalSize] = asyncio.Queue()
    if resize is not None:
        tasks.spawn(_queue_sizes(resize, sizes))
        with contextlib.suppress(TimeoutError):
            first = await asyncio.wait_for(sizes.get(), FIRST_SIZE_WAIT)
            process["consoleSize"] = {"height": first.height, "width": first.width}
    await asyncio.to_thread(files.process.write_text, json.dumps(process))
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for _ in range(3):  # io (its stdin and stdout), resizes, sync
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        ours.append(a)
        theirs.append(b)
    io, ctl, sync = ours
    try:
        argv = [monitor_binary, "exec", "--runc", runc.binary, "--root", str(runc.root),
                "--bundle", str(files.bundle), "--id", container_id,
                "--process", str(files.process), "--pid-file", str(files.pid),
                "--console", files.console, "--runc-log", str(files.runc_log),
                "--resize-fd", str(theirs[1].fileno()), "--sync-fd", str(theirs[2].fileno())]
        try:
            # From the loop's thread, which lives as long as the daemon: ctrmon's
            # PDEATHSIG fires when the thread that forked it ends.
            proc = await spawn.spawn(
                argv, stdin=theirs[0].fileno(), stdout=theirs[0].fileno(), stderr=spawn.PIPE,
                pass_fds=(theirs[1].fileno(), theirs[2].fileno()))
        except OSError as exc:
            raise FailedPrecondition(f"cannot start {monitor_binary} exec: {exc}") from exc
        finally:
            for sock in theirs:
                sock.close()
        diag = bytearray()
        assert proc.stderr is not None
        tasks.spawn(_collect(proc.stderr, diag))
        output = tasks.spawn(_tty_out(io, stdout))
        if stdin is not None:
            tasks.spawn(_tty_in(stdin, io))
        tasks.spawn(_send_sizes(sizes, ctl))
        try:
            report = await _read_sync(sync)
            if "pid" not in report:
                await proc.wait()
                detail = (await asyncio.to_thread(runc_error, files.runc_log)
                          or report.get("error") or diag.decode(errors="replace").strip()
                          or f"ctrmon exec exited {proc.returncode}")
                raise error_for(f"exec {process['args'][0]!r} in container {container_id}",
                                int(report.get("status", 1)), str(detail))
            log.info("exec started container=%s exec=%s pid=%s tty=True", container_id,
                     files.name, report["pid"])
            await proc.wait()
        except BaseException:
            await tasks.close()  # the client's streams are not ours any more
            io.close()  # ctrmon's writes fail from now on: it never waits for us
            await _stop(proc, container_id)
            raise
        await output  # ctrmon drained the pty before exiting: its end is closed
        return _exit_code(proc.returncode)
    finally:
        for sock in ours:
            sock.close()


async def _queue_sizes(resize: ResizeSource, sizes: asyncio.Queue[TerminalSize]) -> None:
    with contextlib.suppress(ConnectionError):
        async for size in resize:
            sizes.put_nowait(size)


async def _send_sizes(sizes: asyncio.Queue[TerminalSize], ctl: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):  # ctrmon has ended
        while True:
            size = await sizes.get()
            await loop.sock_sendall(ctl, f"{size.height} {size.width}\n".encode())


async def _tty_out(io: socket.socket, stdout: ByteSink | None) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await loop.sock_recv(io, CHUNK)
        except OSError:
            return
        if not data:
            return
        if stdout is not None:
            await stdout.write(data)


async def _tty_in(source: ByteSource, io: socket.socket) -> None:
    """Client input to the terminal; the client's half-close becomes EOF for ctrmon (which
    types ^D)."""
    loop = asyncio.get_running_loop()
    try:
        async for chunk in source:
            await loop.sock_sendall(io, chunk)
        io.shutdown(socket.SHUT_WR)
    except OSError:  # the client went away (ConnectionError), or ctrmon has ended
        return


async def _read_sync(sync: socket.socket) -> dict[str, Any]:
    """ctrmon's one JSON line, read until it closes the fd; {} when it said nothing."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sync, 4096):
        data += chunk
    try:
        report = json.loads(data)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


async def _collect(reader: asyncio.StreamReader, into: bytearray) -> None:
    while data := await reader.read(CHUNK):
        into += data[:_DIAG_MAX - len(into)]


async def _stop(proc: spawn.Child, what: str) -> None:
    """SIGTERM makes ctrmon kill the exec'd process and exit; SIGKILL if it does not."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE)
        except TimeoutError:
            log.warning("ctrmon exec did not end on SIGTERM container=%s", what)
            proc.kill()
            await proc.wait()
        log.info("exec cancelled, process killed container=%s", what)


# -- attach ------------------------------------------------------------------------------------


async def attach_container(
    mon: Monitor, *, tty: bool, stdin: ByteSource | None, stdout: ByteSink | None,
    stderr: ByteSink | None, resize: ResizeSource | None,
) -> None:
    """Relay the container's main process stdio through its monitor until the container exited
    (the monitor ends the stream). Cancelled, it detaches: the container keeps running.

    :raises FailedPrecondition: the monitor is gone (the container has exited).
    """
    stream = await mon.attach(stdin=stdin is not None)
    tasks = SessionTasks()
    try:
        if stdin is not None:
            tasks.spawn(_attach_stdin(stream, stdin))
        if tty and resize is not None:
            tasks.spawn(_attach_resizes(stream, resize))
        sinks = {STDOUT: stdout, STDERR: stderr}
        async for tag, data in stream.frames():
            sink = sinks.get(tag)
            if sink is not None and data:
                await sink.write(data)
    finally:
        await tasks.close()
        stream.close()
        log.info("detached monitor=%s", mon.bundle.name)


async def _attach_stdin(stream: AttachStream, source: ByteSource) -> None:
    try:
        async for chunk in source:
            await stream.send_stdin(chunk)
        await stream.close_stdin()  # with stdin_once the container's stdin closes
    except (ConnectionError, OSError):  # the client or the monitor went away
        return


async def _attach_resizes(stream: AttachStream, resize: ResizeSource) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        async for size in resize:
            await stream.resize(size.height, size.width)


# -- port-forward ------------------------------------------------------------------------------


async def port_forward(
    netns_path: Path | None, port: int, *, inbound: ByteSource, outbound: ByteSink
) -> None:
    """One connection to `port` on the pod's loopback (127.0.0.1, else ::1) relayed both ways
    with half-close: `inbound`'s end shuts down our writing, the port's EOF closes `outbound`.
    Returns when both directions are done; cancelled, it closes the connection.

    `netns_path` None: a hostNetwork pod, whose namespace is the daemon's own.

    :raises OSError: the port cannot be reached (ConnectionRefusedError...).
    """
    if netns_path is None:
        sock = await _connect_here(port)
    else:
        # A socket belongs to the namespace it was created in: made and connected there, on a
        # thread of its own (closed if nobody awaits it any more).
        sock = await netns.run_in(netns_path, _connect_loopback, port,
                                  orphan=socket.socket.close)
    try:
        reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    except BaseException:
        sock.close()
        raise
    log.debug("port-forward connected netns=%s port=%d", netns_path, port)
    up = asyncio.create_task(_upstream(inbound, writer))
    down = asyncio.create_task(_downstream(reader, outbound))
    try:
        if await up:
            await down
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()
        await outbound.close()


_LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


def _connect_loopback(port: int) -> socket.socket:
    """Blocking (on the netns thread): the first loopback address that accepts."""
    errors: list[str] = []
    last: OSError | None = None
    for family, address in _LOOPBACKS:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect((address, port))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            errors.append(f"{address}: {exc.strerror or exc}")
    assert last is not None
    raise type(last)(last.errno, f"cannot connect to port {port}: {'; '.join(errors)}")


async def _connect_here(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    last: OSError | None = None
    for family, address in _LOOPBACKS:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (address, port))
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"connect to {address} timed out")
            last = exc
            errors.append(f"{address}: {exc.strerror or exc}")
        except BaseException:
            sock.close()
            raise
    assert last is not None
    raise type(last)(last.errno, f"cannot connect to port {port}: {'; '.join(errors)}")


async def _upstream(inbound: ByteSource, writer: asyncio.StreamWriter) -> bool:
    """Client data to the port; the client's half-close shuts down our writing. False when the
    client went away (not EOF): the connection is closed then, whatever the port still says."""
    try:
        async for chunk in inbound:
            try:
                writer.write(chunk)
                await writer.drain()
            except OSError:  # the port reset: the downstream sees it too
                return True
    except ConnectionError:
        return False
    with contextlib.suppress(OSError):
        writer.write_eof()
    return True


async def _downstream(reader: asyncio.StreamReader, outbound: ByteSink) -> None:
    """The port's data to the client until its EOF (or a reset), then the client's EOF."""
    with contextlib.suppress(OSError):  # a reset ends the stream as EOF does
        while data := await reader.read(CHUNK):
            await outbound.write(data)
    await outbound.close()
