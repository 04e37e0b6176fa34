"""The host half of `kubectl exec/attach/port-forward` into a micro-VM: relays between the
streaming server's byte sources/sinks and the agent's bidirectional Exec, Attach and
PortForward streams.

These streams share the pod's one HTTP/2 connection with every other agent call, so nothing is
left unread in HTTP/2 windows: messages are read at once and back-pressure is the agent
protocol's own credit (agent.proto WINDOW). Agent output waits in an outbox (at most WINDOW
bytes, since the agent stops at that) until the client sink took it, then is acknowledged;
client input is sent only while the agent's acknowledgements leave room. Leaving a relay early
(cancellation: the client went away) resets the agent stream, and the agent kills the exec'd
process, detaches, or closes the connection in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from criserver.backends.microvm.channel import AgentClient, DuplexStream
from criserver.errors import Internal
from criserver.runtime.streaming.interface import ByteSink, ByteSource, ResizeSource, TerminalSize
from criserver.runtime.streaming.session_tasks import SessionTasks
from vmagent.api import agent_pb2 as pb
from vmagent.credit import WINDOW, Credit

log = logging.getLogger(__name__)

# How long an exec with a TTY waits for the client's first window size, so the process starts
# with it (kubectl sends it as soon as its streams are open).
FIRST_SIZE_WAIT = 1.0



class _Outbox:
    """Agent output for the client, written in order by one task, acknowledged once written.
    An agent that sends past its credit (more than WINDOW bytes unacknowledged, beyond a first
    chunk) breaks the protocol: the output is not held for it."""

    def __init__(self, s: DuplexStream, ack: Callable[[int], Any]) -> None:
        self._s = s
        self._ack = ack
        self._held = 0  # bytes put and not yet acknowledged
        # (sink, data or None to close the sink); None ends the outbox.
        self._queue: asyncio.Queue[tuple[ByteSink | None, bytes | None] | None] = \
            asyncio.Queue()

    def put(self, sink: ByteSink | None, data: bytes) -> None:
        """:raises FailedPrecondition: the agent sent past its credit (and is given up)."""
        if self._held and self._held + len(data) > WINDOW:
            raise self._s.violation(f"{self._held + len(data)} bytes of output sent "
                                    f"unacknowledged, over the window of {WINDOW}")
        self._held += len(data)
        self._queue.put_nowait((sink, data))

    def close(self, sink: ByteSink) -> None:
        self._queue.put_nowait((sink, None))

    def finish(self) -> None:
        self._queue.put_nowait(None)

    async def run(self) -> None:
        while (item := await self._queue.get()) is not None:
            sink, data = item
            if sink is not None:
                await (sink.close() if data is None else sink.write(data))
            if data:
                self._held -= len(data)
                await self._s.send(self._ack(len(data)))


def _tty_size(size: TerminalSize) -> pb.TtySize:
    return pb.TtySize(rows=size.height, cols=size.width)


async def _first_size(sizes: asyncio.Queue[TerminalSize], into: pb.TtySize) -> None:
    """The client's first window size (if it comes soon) goes in the start message."""
    with contextlib.suppress(TimeoutError):
        into.CopyFrom(_tty_size(await asyncio.wait_for(sizes.get(), FIRST_SIZE_WAIT)))


async def _feed(s: DuplexStream, source: ByteSource, credit: Credit,
                data: Callable[[bytes], Any], close: Any) -> None:
    """Client input to the agent within the agent's credit; the client's half-close becomes
    `close`. A client that went away ends feeding only: the session is being cancelled."""
    try:
        async for chunk in source:
            if chunk:
                await credit.take(len(chunk))
                await s.send(data(chunk))
    except ConnectionError:
        return
    await s.send(close)


async def _queue_resizes(resize: ResizeSource, sizes: asyncio.Queue[TerminalSize]) -> None:
    with contextlib.suppress(ConnectionError):
        async for size in resize:
            sizes.put_nowait(size)


async def _feed_resizes(s: DuplexStream, sizes: asyncio.Queue[TerminalSize]) -> None:
    while True:
        size = await sizes.get()
        await s.send(pb.StdioInput(resize=_tty_size(size)))


async def _stdio(s: DuplexStream, session: SessionTasks, *, stdin: ByteSource | None,
                 stdout: ByteSink | None, stderr: ByteSink | None,
                 sizes: asyncio.Queue[TerminalSize] | None) -> pb.ExitStatus | None:
    """Relay an Exec or Attach stream until the agent ends it; the exit status if sent."""
    credit = Credit()
    outbox = _Outbox(s, lambda n: pb.StdioInput(output_ack=n))
    delivering = session.spawn(outbox.run())
    if stdin is not None:
        session.spawn(_feed(s, stdin, credit, lambda b: pb.StdioInput(stdin=b),
                            pb.StdioInput(close_stdin=True)))
    if sizes is not None:
        session.spawn(_feed_resizes(s, sizes))
    status = None
    while (msg := await s.recv()) is not None:
        kind = msg.WhichOneof("kind")
        if kind == "stdout":
            outbox.put(stdout, msg.stdout)
        elif kind == "stderr":
            outbox.put(stderr, msg.stderr)
        elif kind == "stdin_ack":
            credit.ack(msg.stdin_ack)
        elif kind == "exit":
            status = msg.exit
    outbox.finish()
    await delivering  # all output reached the client before the session ends
    return status


async def exec_in_vm(
    agent: AgentClient, container_id: str, cmd: list[str], *, tty: bool,
    stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
    resize: ResizeSource | None,
) -> int:
    """Run `cmd` in the container through the agent's Exec stream; its exit code."""
    exec_id = uuid.uuid4().hex[:16]
    session = SessionTasks()
    try:
        start = pb.ExecStart(request_id=exec_id, container_id=container_id, exec_id=exec_id,
                             process=pb.Process(argv=cmd, tty=tty), stdin=stdin is not None)
        sizes = await _terminal_sizes(session, resize if tty else None, start.tty_size)
        async with agent.duplex("Exec") as s:
            await s.send(pb.StdioInput(start=start))
            first = await s.recv()
            if first is None or first.WhichOneof("kind") != "started_pid":
                raise Internal(f"container {container_id}: exec: the agent ended the stream "
                               "before the process started")
            log.info("exec started container=%s exec=%s pid=%d tty=%s", container_id, exec_id,
                     first.started_pid, tty)
            status = await _stdio(s, session, stdin=stdin, stdout=stdout,
                                  stderr=None if tty else stderr, sizes=sizes)
        if status is None:
            raise Internal(f"container {container_id}: exec {exec_id}: no exit status")
        log.info("exec exited container=%s exec=%s code=%d", container_id, exec_id,
                 status.exit_code)
        return int(status.exit_code)
    finally:
        await session.close()


async def _terminal_sizes(session: SessionTasks, resize: ResizeSource | None,
                          first: pb.TtySize) -> asyncio.Queue[TerminalSize] | None:
    """A tty's size changes, queued for the stream: the first one set in `first` (the start
    message) before the stream opens."""
    if resize is None:
        return None
    sizes: asyncio.Queue[TerminalSize] = asyncio.Queue()
    session.spawn(_queue_resizes(resize, sizes))
    await _first_size(sizes, first)
    return sizes


async def attach_in_vm(
    agent: AgentClient, container_id: str, *, tty: bool, stdin: ByteSource | None,
    stdout: ByteSink | None, stderr: ByteSink | None, resize: ResizeSource | None,
) -> None:
    """Relay the container's main process stdio until its output ends."""
    session = SessionTasks()
    try:
        start = pb.AttachStart(container_id=container_id, stdin=stdin is not None,
                               stdout=stdout is not None, stderr=stderr is not None and not tty)
        sizes = await _terminal_sizes(session, resize if tty else None, start.tty_size)
        async with agent.duplex("Attach") as s:
            await s.send(pb.StdioInput(attach=start))
            log.info("attached container=%s tty=%s stdin=%s", container_id, tty,
                     stdin is not None)
            await _stdio(s, session, stdin=stdin, stdout=stdout,
                         stderr=None if tty else stderr, sizes=sizes)
    finally:
        await session.close()
        log.info("detached container=%s", container_id)


async def port_forward_in_vm(
    agent: AgentClient, pod_id: str, port: int, *, inbound: ByteSource, outbound: ByteSink
) -> None:
    """One connection to 127.0.0.1:`port` in the guest, relayed both ways."""
    session = SessionTasks()
    try:
        async with agent.duplex("PortForward") as s:
            await s.send(pb.PortForwardInput(start=pb.PortForwardStart(port=port)))
            first = await s.recv()
            if first is None or not first.connected:
                raise ConnectionError(f"pod {pod_id}: port {port}: no connection in the guest")
            log.debug("port-forward connected pod=%s port=%d", pod_id, port)
            credit = Credit()
            outbox = _Outbox(s, lambda n: pb.PortForwardInput(ack=n))
            delivering = session.spawn(outbox.run())
            session.spawn(_feed(s, inbound, credit, lambda b: pb.PortForwardInput(data=b),
                                pb.PortForwardInput(close_write=True)))
            # The agent ends the stream once both directions are done.
            while (msg := await s.recv()) is not None:
                kind = msg.WhichOneof("kind")
                if kind == "data":
                    outbox.put(outbound, msg.data)
                elif kind == "eof":
                    outbox.close(outbound)
                elif kind == "ack":
                    credit.ack(msg.ack)
            outbox.finish()
            await delivering
    finally:
        await session.close()
        await outbound.close()
