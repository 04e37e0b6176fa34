"""grpclib method tables built from the proto descriptor, so the guest need not import the
generated `agent_grpc` module (it pulls in grpclib's client side, which the agent never uses).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from grpclib.const import Cardinality, Handler

from vmagent.api import agent_pb2 as pb
from vmagent.steps import STEPS_HEADER, TRACE_HEADER, Steps, recording

_CARDINALITY = {
    (False, False): Cardinality.UNARY_UNARY,
    (False, True): Cardinality.UNARY_STREAM,
    (True, False): Cardinality.STREAM_UNARY,
    (True, True): Cardinality.STREAM_STREAM,
}


def mapping_for(service: str, impl: object) -> dict[str, Handler]:
    """{"/pkg.Service/Method": Handler} for every method of `service`, served by the
    same-named coroutine method of `impl`. A missing method is an error at start-up."""
    desc = pb.DESCRIPTOR.services_by_name[service]
    table: dict[str, Handler] = {}
    for method in desc.methods:
        func = getattr(impl, method.name, None)
        if func is None:
            raise TypeError(f"{type(impl).__name__} lacks a handler for {service}.{method.name}")
        unary = not (method.client_streaming or method.server_streaming)
        table[f"/{desc.full_name}/{method.name}"] = Handler(
            _with_steps(func) if unary else func,
            _CARDINALITY[method.client_streaming, method.server_streaming],
            getattr(pb, method.input_type.name),
            getattr(pb, method.output_type.name),
        )
    return table


def _with_steps(func: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    """The unary handler `func`, timing its steps (vmagent.steps) when the host's request
    carries TRACE_HEADER and returning them in the trailing metadata; otherwise as it is."""

    async def handle(stream: Any) -> None:
        if not stream.metadata or TRACE_HEADER not in stream.metadata:
            await func(stream)
            return
        with recording(Steps()) as steps:
            await func(stream)
        # A handler that sent its trailers itself (Shutdown) has none to add; with no steps
        # there is no header (grpclib refuses an empty value).
        if steps.ms and not getattr(stream, "_send_trailing_metadata_done", True):
            await stream.send_trailing_metadata(metadata={STEPS_HEADER: steps.encode()})

    return handle
