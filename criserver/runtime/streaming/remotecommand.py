"""Exec and attach sessions: kubelet's remote command protocol, independent of the transport.

Owns what a session is told at its end (the Kubernetes `Status` on the error stream, JSON from
v4 on, text before), the resize message format, and running the backend call until the process
exits or the client goes away. `spdy_session` serves the protocol over SPDY/3.1 (one stream per
stdio stream, named by the `streamType` header); websocket.py serves it over WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiohttp import web

from criserver.runtime.backend import SandboxBackend
from criserver.runtime.streaming import upgrade
from criserver.runtime.streaming.idle import watch_idle
from criserver.runtime.streaming.interface import (
    ByteSink,
    ByteSource,
    ResizeSource,
    TerminalSize,
)
from criserver.runtime.streaming.spdy import SpdyStream
from criserver.store.records import ContainerRecord, PodRecord

log = logging.getLogger(__name__)

V4, V3, V2, V1 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"
SPDY_PROTOCOLS = [V4, V3, V2, V1]
MAX_RESIZE_MESSAGE = 4096

Status = dict[str, Any]
StatusWriter = Callable[[Status], Awaitable[None]]


class StdioTarget(Protocol):
    """What an exec/attach token names: the session's shape, and what runs it. CRI containers
    (StdioRequest) and IRI machine consoles (criserver/machine/console.py) are both served
    through this one path, whichever transport the client picks."""

    @property
    def kind(self) -> Literal["exec", "attach"]: ...
    @property
    def cmd(self) -> tuple[str, ...]: ...
    @property
    def tty(self) -> bool: ...
    @property
    def stdin(self) -> bool: ...
    @property
    def stdout(self) -> bool: ...
    @property
    def stderr(self) -> bool: ...
    @property
    def subject(self) -> str: ...

    def start(self, stdio: Stdio) -> Awaitable[int | None]:
        """Run the session on the client's streams: the exit code (exec), or None."""


@dataclass(frozen=True)
class StdioRequest:
    """An Exec or Attach request for a CRI container, as its token names it."""

    kind: Literal["exec", "attach"]
    backend: SandboxBackend
    pod: PodRecord
    container: ContainerRecord
    cmd: tuple[str, ...] = ()
    tty: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False

    @property
    def subject(self) -> str:
        return f"{self.kind} container={self.container.id} pod={self.pod.id}"

    def start(self, stdio: Stdio) -> Awaitable[int | None]:
        if self.kind == "exec":
            return self.backend.exec(
                self.pod, self.container, list(self.cmd), tty=self.tty, stdin=stdio.stdin,
                stdout=stdio.stdout, stderr=stdio.stderr, resize=stdio.resize)
        return self.backend.attach(
            self.pod, self.container, tty=self.tty, stdin=stdio.stdin, stdout=stdio.stdout,
            stderr=stdio.stderr, resize=stdio.resize)


@dataclass
class Stdio:
    """The client's streams, transport-neutral."""

    stdin: ByteSource | None
    stdout: ByteSink | None
    stderr: ByteSink | None
    resize: ResizeSource | None
    write_status: StatusWriter


# -- status and resize messages --------------------------------------------------------------


def success() -> Status:
    return {"metadata": {}, "status": "Success"}


def exit_failure(code: int, cmd: tuple[str, ...]) -> Status:
    """What kubelet sends for a non-zero exit: client-go turns the cause into the exit code."""
    code = min(max(code, 0), 255)  # client-go parses it as a uint8
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command "
                   f"{list(cmd)}, exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_error(message: str) -> Status:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: Status, protocol: str) -> bytes:
    """The error stream's content: v4 and later JSON always; earlier only failures, as text."""
    if protocol.startswith(("v4.", "v5.")):
        return json.dumps(status, separators=(",", ":")).encode()
    if status["status"] == "Success":
        return b""
    return str(status.get("message", "")).encode()


async def decode_resizes(source: ByteSource) -> AsyncIterator[TerminalSize]:
    """Terminal sizes from a stream of JSON objects ({"Width":80,"Height":24}, Go's field names;
    matched case-insensitively as Go's decoder does). Stops at the first undecodable input."""
    decoder = json.JSONDecoder()
    with contextlib.suppress(ConnectionError):  # a client that left sends no more sizes
        async for size in _decode(decoder, source):
            yield size


async def _decode(decoder: json.JSONDecoder, source: ByteSource) -> AsyncIterator[TerminalSize]:
    buffer = ""
    async for chunk in source:
        buffer += chunk.decode(errors="replace")
        while buffer.strip():
            try:
                value, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                if len(buffer) > MAX_RESIZE_MESSAGE:
                    return
                break
            buffer = buffer.lstrip()[end:]
            if isinstance(value, dict):
                fields = {str(k).lower(): v for k, v in value.items()}
                width, height = fields.get("width"), fields.get("height")
                if isinstance(width, int) and isinstance(height, int):
                    yield TerminalSize(width=width, height=height)


# -- running the backend ---------------------------------------------------------------------


async def run(request: StdioTarget, stdio: Stdio, gone: asyncio.Event) -> None:
    """Run the session until it ends (then tell the client how) or the client is gone (then
    cancel it: an exec'd process is killed, an attach detaches)."""
    task = asyncio.ensure_future(request.start(stdio))
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            log.info("client went away: session cancelled %s", request.subject)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("%s failed: %s", request.subject, exc, exc_info=exc)
        verb = "executing command in" if request.kind == "exec" else "attaching to"
        status = internal_error(f"error {verb} container: {exc}")
    elif request.kind == "exec" and task.result():
        code = int(task.result() or 0)
        log.info("%s exited exit_code=%d", request.subject, code)
        status = exit_failure(code, request.cmd)
    else:
        log.info("%s finished", request.subject)
        status = success()
    for sink in (stdio.stdout, stdio.stderr):
        if sink is not None:
            await sink.close()  # clients wait for EOF on stdout/stderr before reading the status
    await stdio.write_status(status)


# -- over SPDY -------------------------------------------------------------------------------


async def spdy_session(
    http: web.Request, request: StdioTarget, idle_timeout: float, creation_timeout: float
) -> web.StreamResponse:
    """Serve one exec/attach over SPDY/3.1: the client opens an error stream and one stream per
    requested stdio stream (plus resize with a TTY from v3 on); the session starts once all
    are open, or ends after `creation_timeout`."""
    protocol = upgrade.negotiate(http, SPDY_PROTOCOLS)
    expected = {"error"}
    expected |= {name for name, wanted in (("stdin", request.stdin), ("stdout", request.stdout),
                                           ("stderr", request.stderr)) if wanted}
    if request.tty and protocol in (V4, V3):
        expected.add("resize")
    streams: dict[str, SpdyStream] = {}
    all_open = asyncio.Event()

    def on_stream(stream: SpdyStream) -> bool:
        kind = stream.header("streamType")
        if kind not in expected or kind in streams:
            log.info("refusing unexpected stream type=%r %s", kind, request.subject)
            return False
        streams[kind] = stream
        if len(streams) == len(expected):
            all_open.set()
        return True

    response, session = await upgrade.upgrade(http, protocol, on_stream, request.subject)
    log.info("streaming session started protocol=%s transport=spdy %s", protocol,
             request.subject)
    idle = asyncio.ensure_future(watch_idle(lambda: session.last_activity, idle_timeout,
                                            session.close))
    try:
        if not await _first(all_open, session.done, creation_timeout):
            log.warning("client did not open its streams in time (%.0fs) %s",
                        creation_timeout, request.subject)
            return response
        error_stream = streams["error"]

        async def write_status(status: Status) -> None:
            data = encode_status(status, protocol)
            if data:
                await error_stream.write(data)
            await error_stream.close()

        resize = streams.get("resize")
        stdio = Stdio(
            stdin=streams["stdin"].chunks() if "stdin" in streams else None,
            stdout=streams.get("stdout"),
            stderr=streams.get("stderr"),
            resize=decode_resizes(resize.chunks()) if resize is not None else None,
            write_status=write_status,
        )
        await run(request, stdio, session.done)
    except asyncio.CancelledError:
        session.abort()  # the daemon stops: no lingering
        raise
    finally:
        idle.cancel()
        await session.close()
    return response


async def _first(event: asyncio.Event, done: asyncio.Event, timeout: float) -> bool:
    """Whether `event` was set before `done` and within `timeout`."""
    waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(done.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return event.is_set() and not done.is_set()
