"""Attach: the container's main process as it runs. Output is read from the container's stdio
buffer from its current end on (a slow host skips what the bounded buffer dropped; the
container never waits for an attached client), stdin goes to the pipe or pty the agent kept
open at create, resizes to the pty. The stream ends when the container's output does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.credit import Credit
from vmagent.exec_stream import Send
from vmagent.fdio import set_winsize, write_all
from vmagent.stdio import STDERR

if TYPE_CHECKING:
    from grpclib.server import Stream

    from vmagent.containers import Container, Containers

log = logging.getLogger("vmagent")

# Once the output ended, how long to wait for the exit status to send it last.
_EXIT_WAIT = 2.0


async def _feed(stream: Stream[pb.StdioInput, Any], c: Container, stdin: bool,
                credit: Credit, send: Send) -> None:
    """Host messages, read at once; stdin waits in a queue the host's credit bounds."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: close stdin (stdin_once)

    async def write_stdin() -> None:
        while True:
            data = await queue.get()
            if data is None:
                c.close_stdin()
                continue
            if c.stdin_fd >= 0:
                try:
                    await write_all(c.stdin_fd, data)
                except OSError:
                    c.close_stdin()  # the process closed its end
            await send(pb.StdioOutput(stdin_ack=len(data)))

    writer = asyncio.ensure_future(write_stdin())
    try:
        while (msg := await stream.recv_message()) is not None:
            kind = msg.WhichOneof("kind")
            if kind == "stdin" and stdin:
                queue.put_nowait(msg.stdin)
            elif kind == "close_stdin" and stdin and c.stdin_once:
                queue.put_nowait(None)
            elif kind == "resize":
                _resize(c, msg.resize)
            elif kind == "output_ack":
                credit.ack(msg.output_ack)
        await writer
    finally:
        writer.cancel()


def _resize(c: Container, size: pb.TtySize) -> None:
    if c.console_fd >= 0 and size.rows and size.cols:
        with contextlib.suppress(OSError):
            set_winsize(c.console_fd, size.rows, size.cols)


async def serve_attach(stream: Stream[pb.StdioInput, pb.StdioOutput],
                       containers: Containers) -> None:
    first = await stream.recv_message()
    if first is None or first.WhichOneof("kind") != "attach":
        raise GRPCError(Status.INVALID_ARGUMENT, "Attach: the first message must be `attach`")
    start = first.attach
    c = containers.get(start.container_id)
    if start.stdin and c.stdin_fd < 0 and not c.stdin_attached:
        raise GRPCError(Status.FAILED_PRECONDITION,
                        f"container {c.id} was not created with stdin")
    stdin = start.stdin and c.stdin_fd >= 0
    first_with_stdin = stdin and not c.stdin_attached
    if stdin:
        c.stdin_attached = True
    if start.HasField("tty_size"):
        _resize(c, start.tty_size)
    log.info("attach id=%s stdin=%s stdout=%s stderr=%s", c.id, stdin, start.stdout,
             start.stderr)
    credit = Credit()
    send_lock = asyncio.Lock()

    async def send(msg: pb.StdioOutput) -> None:
        async with send_lock:
            await stream.send_message(msg)

    feeder = asyncio.ensure_future(_feed(stream, c, stdin, credit, send))
    output = asyncio.ensure_future(_relay_output(c, start, credit, send))
    try:
        done, _ = await asyncio.wait({feeder, output}, return_when=asyncio.FIRST_COMPLETED)
        if feeder in done and feeder.exception() is not None:
            raise feeder.exception()  # type: ignore[misc]
        await output
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(c.stopped.wait(), _EXIT_WAIT)
        if c.exit is not None:
            await send(pb.StdioOutput(exit=c.exit))
    finally:
        feeder.cancel()
        output.cancel()
        await asyncio.gather(feeder, output, return_exceptions=True)
        if first_with_stdin and c.stdin_once:
            c.close_stdin()
        log.info("detached id=%s", c.id)


async def _relay_output(c: Container, start: pb.AttachStart, credit: Credit,
                        send: Send) -> None:
    out = c.output
    offset = out.end  # live from now on: what was written before is in the log
    while True:
        chunks = out.read(offset)
        for ch in chunks:
            offset = ch.end
            if ch.stream == STDERR and start.stderr:
                await credit.take(len(ch.data))
                await send(pb.StdioOutput(stderr=ch.data))
            elif ch.stream != STDERR and start.stdout:
                await credit.take(len(ch.data))
                await send(pb.StdioOutput(stdout=ch.data))
        if chunks:
            continue
        if out.eof:
            return
        await out.wait_beyond(offset)
