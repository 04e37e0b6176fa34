"""ReadStdio: streams a container's OutputLog to the host from a given offset, acknowledging
what came before it, and (with `follow`) keeps streaming until the output's EOF.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vmagent.api import agent_pb2 as pb
from vmagent.stdio import OutputLog


async def read_stdio(req: pb.ReadStdioRequest, output: OutputLog,
                     send: Callable[[pb.StdioChunk], Awaitable[None]]) -> None:
    offset = req.offset
    # The host persisted everything before its offset: that part of the buffer is free now.
    output.ack(offset)
    while True:
        chunks = output.read(offset)
        for ch in chunks:
            await send(pb.StdioChunk(offset=ch.offset, stream=ch.stream,  # type: ignore[arg-type]
                                     data=ch.data, time_unix_nanos=ch.time_ns))
            offset = ch.end
        if chunks:
            continue
        if output.eof:
            await send(pb.StdioChunk(offset=max(offset, output.end), eof=True))
            return
        if not req.follow:
            return
        await output.wait_beyond(offset)
