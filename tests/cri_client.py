"""A CRI client built from the upstream reference proto, never from criserver's own copy.

The reference `api.proto` (../shared/reference/cri-api/) is compiled at test time into a private
descriptor pool, so its message classes cannot collide with criserver's generated ones and any
difference between the two wire formats shows up as a failing test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

REPO = Path(__file__).resolve().parents[1]
REFERENCE_PROTO = Path(
    os.environ.get("CRI_REFERENCE_PROTO", REPO.parent / "shared/reference/cri-api/api.proto")
)
OWN_PROTO = REPO / "proto/runtime/v1/api.proto"


def reference_proto() -> Path:
    if REFERENCE_PROTO.exists():
        return REFERENCE_PROTO
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs the reference CRI proto at {REFERENCE_PROTO}")
    print(f"warning: {REFERENCE_PROTO} missing: testing against criserver's own proto",
          file=sys.stderr)
    return OWN_PROTO


def compile_descriptor_set(proto: Path) -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}",
             f"--descriptor_set_out={out}", proto.name],
            check=True,
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@cache
def reference_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in compile_descriptor_set(reference_proto()).file:
        pool.Add(file)
    return pool


def msg(type_name: str, /, **fields: Any) -> Message:
    """A message of the reference CRI, e.g. msg("PodSandboxConfig", hostname="x")."""
    descriptor = reference_pool().FindMessageTypeByName(f"runtime.v1.{type_name}")
    cls = message_factory.GetMessageClass(descriptor)
    return cls(**fields)


def enum(name: str) -> int:
    """The number of an enum value of the reference CRI, e.g. enum("SANDBOX_READY")."""
    for file in compile_descriptor_set(reference_proto()).file:
        for e in file.enum_type:
            for value in e.value:
                if value.name == name:
                    return value.number
    raise KeyError(name)


class Service:
    """The methods of one CRI service as awaitables: `await client.runtime.Version(req)`."""

    def __init__(self, channel: grpc.aio.Channel, full_name: str) -> None:
        service = reference_pool().FindServiceByName(full_name)
        self._calls: dict[str, Any] = {}
        for method in service.methods:
            out = message_factory.GetMessageClass(method.output_type)
            path = f"/{full_name}/{method.name}"
            factory = channel.unary_stream if method.server_streaming else channel.unary_unary
            self._calls[method.name] = factory(
                path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=out.FromString,
            )
        self._input = {m.name: message_factory.GetMessageClass(m.input_type)
                       for m in service.methods}

    def __getattr__(self, name: str) -> Any:
        try:
            call = self._calls[name]
        except KeyError:
            raise AttributeError(name) from None

        def invoke(request: Message | None = None, **kwargs: Any) -> Any:
            return call(request if request is not None else self._input[name](), **kwargs)

        return invoke


class CRIClient:
    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.runtime = Service(self.channel, "runtime.v1.RuntimeService")
        self.image = Service(self.channel, "runtime.v1.ImageService")

    async def close(self) -> None:
        await self.channel.close()

    # Shorthands for the common calls in tests -------------------------------------------

    def pod_config(self, name: str, namespace: str = "default", uid: str | None = None,
                   attempt: int = 0, **fields: Any) -> Message:
        return msg("PodSandboxConfig", metadata=msg(
            "PodSandboxMetadata", name=name, namespace=namespace, uid=uid or f"uid-{name}",
            attempt=attempt), **fields)

    async def run_pod(self, name: str, handler: str = "", **fields: Any) -> str:
        config = self.pod_config(name, **fields)
        response = await self.runtime.RunPodSandbox(
            msg("RunPodSandboxRequest", config=config, runtime_handler=handler))
        return str(response.pod_sandbox_id)

    def container_config(self, name: str, image: str = "busybox", attempt: int = 0,
                         **fields: Any) -> Message:
        return msg("ContainerConfig",
                   metadata=msg("ContainerMetadata", name=name, attempt=attempt),
                   image=msg("ImageSpec", image=image), **fields)

    async def create_container(self, pod_id: str, name: str, pod_name: str | None = None,
                               **fields: Any) -> str:
        config = self.container_config(name, **fields)
        response = await self.runtime.CreateContainer(msg(
            "CreateContainerRequest", pod_sandbox_id=pod_id, config=config,
            sandbox_config=self.pod_config(pod_name or "pod")))
        return str(response.container_id)
