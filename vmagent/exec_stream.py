"""Exec: an interactive process in a container (or, with no container_id, in the guest itself),
its stdin fed from the host's messages, its stdout/stderr streamed back one chunk at a time
(a read waits for the host's credit, see agent.proto WINDOW: a slow client stops us reading and
the pipe fills: back-pressure, not memory), with a pty when `process.tty`, and the exit status
as the last message. The stream ending early (host gone) kills the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.credit import Credit
from vmagent.execsync import kill_pid
from vmagent.fdio import close_quietly, openpty_in, read_chunk, set_winsize, write_all
from vmagent.pid1 import ChildExit, Reaper

if TYPE_CHECKING:
    from grpclib.server import Stream

    from vmagent.containers import Containers

log = logging.getLogger("vmagent")

# After the process exits, children it left behind may hold its output open: wait this long.
_DRAIN_AFTER_EXIT = 0.5
_EOT = b"\x04"  # what "end of input" is on a terminal in canonical mode


@dataclass
class ProcIO:
    """Our ends of one process's stdio."""

    stdin: int = -1  # pipe write end, or the pty master (then closing stdin sends EOT)
    outputs: list[tuple[int, str]] = field(default_factory=list)  # (fd, "stdout"/"stderr")
    tty: int = -1  # pty master, for resizes

    def close_stdin(self) -> None:
        if self.stdin < 0:
            return
        if self.tty >= 0:
            with contextlib.suppress(OSError):
                os.write(self.stdin, _EOT)
        close_quietly(self.stdin)
        self.stdin = -1

    def resize(self, size: pb.TtySize) -> None:
        if self.tty >= 0 and size.rows and size.cols:
            with contextlib.suppress(OSError):
                set_winsize(self.tty, size.rows, size.cols)

    def close(self) -> None:
        close_quietly(self.stdin, self.tty, *(fd for fd, _ in self.outputs))
        self.stdin = self.tty = -1
        self.outputs = []


@dataclass
class Spawned:
    exited: asyncio.Future[ChildExit]
    pids: list[int]  # to SIGKILL when the host goes away (the exec'd process first)
    io: ProcIO


def _stdio_pair(tty: bool, stdin: bool, size: pb.TtySize | None,
                pty_pid: int = 0) -> tuple[ProcIO, list[int]]:
    """(our ends, the child's stdin/stdout/stderr fds); the pty from `pty_pid`'s container."""
    if tty:
        master, slave = openpty_in(pty_pid) if pty_pid else os.openpty()
        os.set_blocking(master, False)
        io = ProcIO(stdin=os.dup(master) if stdin else -1, outputs=[(master, "stdout")],
                    tty=os.dup(master))
        if size is not None:
            io.resize(size)
        return io, [slave, slave, slave]
    io = ProcIO()
    child = []
    if stdin:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        io.stdin = w
        child.append(r)
    else:
        child.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    for name in ("stdout", "stderr"):
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        io.outputs.append((r, name))
        child.append(w)
    return io, child


def _fork_plain(argv: list[str], env: dict[str, str], cwd: str, fds: list[int],
                tty: bool) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGIO,
                        signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            if tty:
                import fcntl
                import termios

                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if cwd:
                os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"exec {argv[0]}: {exc}\n".encode())
        os._exit(127)
    return pid


async def _spawn_in_guest(start: pb.ExecStart, reaper: Reaper) -> Spawned:
    p = start.process
    env = dict(e.split("=", 1) for e in p.env if "=" in e) if p.env else dict(os.environ)
    io, child = _stdio_pair(p.tty, start.stdin, start.tty_size if p.tty else None)
    try:
        pid = _fork_plain(list(p.argv), env, p.cwd, child, p.tty)
    except BaseException:
        io.close()
        raise
    finally:
        close_quietly(*set(child))
    return Spawned(reaper.watch(pid), [pid], io)


async def _spawn_in_container(start: pb.ExecStart, containers: Containers) -> Spawned:
    from vmagent.container_exec import plan_exec

    _, process, plan = plan_exec(containers, start.container_id, start.process)
    if plan is not None:
        return await _spawn_fast(start, containers, plan)
    assert process is not None
    return await _spawn_with_runtime(start, containers, process)


async def _spawn_fast(start: pb.ExecStart, containers: Containers, plan: Any) -> Spawned:
    from vmagent.container_exec import start_fast

    tty = start.process.tty
    c = containers.get(start.container_id)
    io, child = _stdio_pair(tty, start.stdin, start.tty_size if tty else None, c.pid)
    try:
        pid, exited = await start_fast(containers, c.id, plan, child[1], child[2],
                                       stdin=child[0], tty=tty)
    except BaseException:
        io.close()
        raise
    finally:
        close_quietly(*set(child))
    return Spawned(exited, [pid], io)


async def _spawn_with_runtime(start: pb.ExecStart, containers: Containers,
                              process: dict[str, Any]) -> Spawned:
    """`<runtime> exec --detach`: the process is re-parented to us (PID 1) when the runtime
    returns; with a tty, the runtime hands us the pty master over a console socket."""
    from vmagent.console import ConsoleSocket
    from vmagent.ociruntime import log_errors, spawn

    c = containers.get(start.container_id)
    tty = start.process.tty
    c.exec_serial += 1
    base = os.path.join(c.bundle, f"exec-{c.exec_serial}")
    proc_file, pid_file, log_file = base + ".json", base + ".pid", base + ".log"
    process["terminal"] = tty
    if tty and start.HasField("tty_size"):
        process["consoleSize"] = {"height": start.tty_size.rows, "width": start.tty_size.cols}
    await asyncio.to_thread(_write, proc_file, json.dumps(process))
    r = containers.runtime
    argv = [r.binary, "--root", r.root, "--log", log_file, "--log-format", "json", "exec",
            "--detach", "--process", proc_file, "--pid-file", pid_file]
    console = ConsoleSocket(base + ".sock") if tty else None
    if console is not None:
        argv += ["--tty", "--console-socket", console.path]
        io, child = ProcIO(), [os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)] * 3
    else:
        io, child = _stdio_pair(False, start.stdin, None)
    argv.append(c.id)
    receiving: asyncio.Future[int] | None = None
    try:
        receiving = asyncio.ensure_future(console.receive()) if console is not None else None
        try:
            runtime_pid = spawn(argv, child[0], child[1], child[2])
        finally:
            close_quietly(*set(child))
        status = await containers.reaper.watch(runtime_pid)
        if status.code != 0:
            raise GRPCError(Status.FAILED_PRECONDITION, f"container {c.id}: exec "
                            f"{start.process.argv[0]!r} failed: {log_errors(log_file)}")
        if receiving is not None:
            master = await asyncio.wait_for(receiving, 10)
            io.outputs = [(master, "stdout")]
            io.tty = os.dup(master)
            io.stdin = os.dup(master) if start.stdin else -1
        pid = await asyncio.to_thread(_read_int, pid_file)
    except BaseException:
        io.close()
        if receiving is not None:
            receiving.cancel()
        raise
    finally:
        if console is not None:
            console.close()
        await asyncio.to_thread(_remove, proc_file, pid_file, log_file)
    return Spawned(containers.reaper.watch(pid), [pid], io)


def _read_int(path: str) -> int:
    with open(path) as f:  # tmpfs
        return int(f.read().strip())


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:  # tmpfs
        f.write(text)


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


Send = Callable[[pb.StdioOutput], Awaitable[None]]


async def pump_output(fd: int, name: str, send: Send, credit: Credit) -> None:
    """One output fd to the host until EOF; reads wait for the host's credit."""
    while data := await read_chunk(fd):
        await credit.take(len(data))
        await send(pb.StdioOutput(stdout=data) if name == "stdout" else
                   pb.StdioOutput(stderr=data))


async def pump_input(stream: Stream[pb.StdioInput, Any], io: ProcIO, credit: Credit,
                     send: Send, what: str) -> None:
    """Host messages until the host ends its side, read at once (never blocked by the
    process: stdin waits in a queue the host's credit bounds). Raises when the stream breaks
    (host gone): the caller then kills the process."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: close stdin

    async def write_stdin() -> None:
        while True:
            data = await queue.get()
            if data is None:
                io.close_stdin()
                continue
            if io.stdin >= 0:
                try:
                    await write_all(io.stdin, data)
                except OSError:
                    io.close_stdin()  # the process closed its stdin: drop the rest
            await send(pb.StdioOutput(stdin_ack=len(data)))

    writer = asyncio.ensure_future(write_stdin())
    try:
        while (msg := await stream.recv_message()) is not None:
            kind = msg.WhichOneof("kind")
            if kind == "stdin":
                queue.put_nowait(msg.stdin)
            elif kind == "close_stdin":
                queue.put_nowait(None)
            elif kind == "resize":
                io.resize(msg.resize)
            elif kind == "output_ack":
                credit.ack(msg.output_ack)
            else:
                log.warning("%s: unexpected input message kind=%s", what, kind)
        await writer  # the host is done sending; stdin still drains (cancelled at exit)
    finally:
        writer.cancel()


def exit_status(ex: ChildExit) -> pb.ExitStatus:
    code = ex.code
    return pb.ExitStatus(exit_code=code, signal=ex.signal,
                         reason="Completed" if code == 0 else "Error",
                         finished_at_unix_nanos=ex.finished_at_ns)


async def serve_exec(stream: Stream[pb.StdioInput, pb.StdioOutput], reaper: Reaper,
                     containers: Callable[[], Containers]) -> None:
    first = await stream.recv_message()
    if first is None or first.WhichOneof("kind") != "start":
        raise GRPCError(Status.INVALID_ARGUMENT, "Exec: the first message must be `start`")
    start = first.start
    if not start.process.argv:
        raise GRPCError(Status.INVALID_ARGUMENT, "Exec: empty argv")
    what = f"exec id={start.container_id or '-'} exec_id={start.exec_id}"
    if start.container_id:
        spawned = await _spawn_in_container(start, containers())
    else:
        spawned = await _spawn_in_guest(start, reaper)
    io = spawned.io
    log.info("%s started pid=%d tty=%s argv0=%s", what, spawned.pids[0], start.process.tty,
             start.process.argv[0])
    send_lock = asyncio.Lock()

    async def send(msg: pb.StdioOutput) -> None:
        async with send_lock:  # two output pumps must not interleave a message's frames
            await stream.send_message(msg)

    credit = Credit()
    feeder = asyncio.ensure_future(pump_input(stream, io, credit, send, what))
    outputs = asyncio.ensure_future(asyncio.gather(
        *(pump_output(fd, name, send, credit) for fd, name in io.outputs)))
    finished = False
    try:
        await send(pb.StdioOutput(started_pid=spawned.pids[0]))
        await _wait_exit(spawned.exited, outputs, feeder)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(outputs), _DRAIN_AFTER_EXIT)
        outputs.cancel()
        ex = spawned.exited.result()
        await send(pb.StdioOutput(exit=exit_status(ex)))
        finished = True
        log.info("%s exited code=%d", what, ex.code)
    finally:
        feeder.cancel()
        outputs.cancel()
        if not finished:
            for pid in spawned.pids:
                kill_pid(pid, signal.SIGKILL)
            log.info("%s: host went away, process killed", what)
        await asyncio.gather(feeder, outputs, return_exceptions=True)
        io.close()


async def _wait_exit(exited: asyncio.Future[ChildExit], outputs: asyncio.Future[Any],
                     feeder: asyncio.Future[None]) -> None:
    """Until the process exits; raises what broke the stream if the host goes first."""
    waits: set[asyncio.Future[Any]] = {exited, outputs, feeder}
    while not exited.done():
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            if fut is not exited and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
        waits -= done
        waits.add(exited)
