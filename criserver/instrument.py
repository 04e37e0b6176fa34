"""The one layer every RPC passes through: logging, timing and error mapping.

Services are tables of plain async functions (request -> response), one table per gRPC service,
each built by its servicer module (criserver/runtime/servicer.py, criserver/image/servicer.py,
criserver/admin.py) beside a MISSING dict. This module registers every method of a service
descriptor with grpcio: implemented ones wrapped so that domain errors become their gRPC status
codes and each call is logged with its duration and the pod/container ID it names; the rest
answer UNIMPLEMENTED with the reason MISSING gives. A request body that does not parse as its
message type is answered INVALID_ARGUMENT before any function sees it.
Functions may return pre-encoded response bytes (see the List* calls) instead of messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from criserver import trace
from criserver.errors import CriError, DeadlineExceeded

log = logging.getLogger("criserver.rpc")

Unary = Callable[[Any], Awaitable[Message | bytes]]
Streaming = Callable[[Any], AsyncIterator[Message | bytes]]
# Calls kubelet makes every few seconds: logged at debug level to keep the log readable.
READ_ONLY_PREFIXES = ("List", "Stream", "Version", "Status", "ImageStatus", "ImageFsInfo",
                      "PodSandboxStatus", "ContainerStatus", "ContainerStats", "PodSandboxStats",
                      "RuntimeConfig")
ID_FIELDS = ("pod_sandbox_id", "container_id", "machine_id")


def _serialize(response: Message | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class Undecodable:
    """A request body that is not a message of the method's type. grpcio answers UNKNOWN (and
    logs a traceback per call) when the deserializer raises, so the parse failure is carried to
    the handler as this value instead and answered INVALID_ARGUMENT there."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def request_parser(request_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    name = request_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return request_type.FromString(data)
        except Exception as exc:  # whatever the parser raises, the bytes are the caller's fault
            return Undecodable(f"request is not a valid {name}: {exc}")

    return parse


async def _refuse_undecodable(
    context: grpc.aio.ServicerContext, method: str, request: Undecodable
) -> None:
    log.info("rpc=%s code=INVALID_ARGUMENT error=%s", method, request.error)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)


def _subject(request: Message) -> str:
    parts = []
    for name in ID_FIELDS:
        value = getattr(request, name, "")
        if value:
            parts.append(f" {name.removesuffix('_sandbox_id').removesuffix('_id')}={value}")
    image = getattr(request, "image", None)
    image_name = getattr(image, "image", None) if isinstance(image, Message) else None
    if image_name:
        parts.append(f" image={image_name}")
    return "".join(parts)


async def _fail(context: grpc.aio.ServicerContext, method: str, subject: str,
                started: float, exc: BaseException) -> None:
    elapsed_ms = (time.perf_counter() - started) * 1000
    if isinstance(exc, CriError):
        log.info("rpc=%s%s code=%s duration_ms=%.2f error=%s",
                 method, subject, exc.code.name, elapsed_ms, exc.message)
        await context.abort(exc.code, exc.message)
    log.error("rpc=%s%s code=INTERNAL duration_ms=%.2f", method, subject, elapsed_ms,
              exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error: {exc!r}")


def _unary(method: str, fn: Unary,
           traced: bool = False) -> Callable[..., Awaitable[Message | bytes]]:
    level = logging.DEBUG if method.startswith(READ_ONLY_PREFIXES) else logging.INFO

    async def handle(
        request: Message | Undecodable, context: grpc.aio.ServicerContext
    ) -> Message | bytes:
        if isinstance(request, Undecodable):
            await _refuse_undecodable(context, method, request)
            raise AssertionError("unreachable: abort raises")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(context.time_remaining()):
                if traced:
                    response = await trace.traced(method, _subject(request), fn(request))
                else:
                    response = await fn(request)
        except TimeoutError:
            await _fail(context, method, _subject(request), started, DeadlineExceeded(
                f"{method} did not finish before the caller's deadline"))
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            log.info("rpc=%s%s cancelled", method, _subject(request))
            raise
        except Exception as exc:
            await _fail(context, method, _subject(request), started, exc)
            raise  # unreachable: abort raises
        if log.isEnabledFor(level):
            log.log(level, "rpc=%s%s code=OK duration_ms=%.2f", method, _subject(request),
                    (time.perf_counter() - started) * 1000)
        return response

    return handle


def _streaming(method: str, fn: Streaming) -> Callable[..., AsyncIterator[Message | bytes]]:
    async def handle(
        request: Message | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message | bytes]:
        if isinstance(request, Undecodable):
            await _refuse_undecodable(context, method, request)
            return
        started = time.perf_counter()
        log.info("rpc=%s stream opened", method)
        try:
            async for item in fn(request):
                yield item
        except asyncio.CancelledError:
            log.info("rpc=%s stream closed by the client", method)
            raise
        except Exception as exc:
            await _fail(context, method, "", started, exc)
        log.info("rpc=%s stream done duration_ms=%.2f", method,
                 (time.perf_counter() - started) * 1000)

    return handle


def _unimplemented(full_name: str, reason: str) -> Callable[..., Any]:
    message = f"{full_name} is not implemented by criserver yet: {reason}"

    async def handle(request: Message | Undecodable, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            await _refuse_undecodable(context, full_name, request)
        log.info("rpc=%s code=UNIMPLEMENTED", full_name)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handle


def generic_handler(
    service: ServiceDescriptor,
    implemented: dict[str, Unary | Streaming],
    missing: dict[str, str],
    traced: frozenset[str] = frozenset(),
) -> grpc.GenericRpcHandler:
    """Register every method of `service`; `missing` says why the unimplemented ones are;
    the methods named in `traced` log their step timings (criserver.trace)."""
    unknown = set(implemented) - set(service.methods_by_name)
    if unknown:
        raise ValueError(f"{service.full_name} has no methods {sorted(unknown)}")
    handlers = {}
    for method in service.methods:
        handlers[method.name] = _method_handler(service, method, implemented, missing,
                                                method.name in traced)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _method_handler(
    service: ServiceDescriptor,
    method: MethodDescriptor,
    implemented: dict[str, Unary | Streaming],
    missing: dict[str, str],
    traced: bool = False,
) -> grpc.RpcMethodHandler:
    request_type = message_factory.GetMessageClass(method.input_type)
    kwargs = {"request_deserializer": request_parser(request_type),
              "response_serializer": _serialize}
    fn = implemented.get(method.name)
    if method.client_streaming:
        raise ValueError(f"{method.full_name}: client streaming is not used by the CRI")
    if fn is None:
        handler = _unimplemented(method.full_name, missing.get(method.name, "not built yet"))
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(handler, **kwargs)
        return grpc.unary_unary_rpc_method_handler(handler, **kwargs)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(method.name, fn), **kwargs)  # type: ignore[arg-type]
    return grpc.unary_unary_rpc_method_handler(_unary(method.name, fn, traced), **kwargs)  # type: ignore[arg-type]
