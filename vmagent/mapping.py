"""grpclib method tables built from the proto descriptor, so the guest need not import the
generated `agent_grpc` module (it pulls in grpclib's client side, which the agent never uses).
"""

from __future__ import annotations

from grpclib.const import Cardinality, Handler

from vmagent.api import agent_pb2 as pb

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
        table[f"/{desc.full_name}/{method.name}"] = Handler(
            func,
            _CARDINALITY[method.client_streaming, method.server_streaming],
            getattr(pb, method.input_type.name),
            getattr(pb, method.output_type.name),
        )
    return table
