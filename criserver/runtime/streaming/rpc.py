"""Exec, Attach and PortForward, the CRI calls: validate the request as kubelet's streaming
server does, check the container or pod can serve it, and return a single-use URL on the
streaming server (`Runtime.streaming`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import FailedPrecondition, InvalidArgument, Unavailable, Unimplemented
from criserver.runtime.backend import SandboxBackend
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerRecord, ContainerState, PodRecord, PodState

# The protocol modules (and aiohttp under them) load with the server, on first use.
if TYPE_CHECKING:
    from criserver.runtime.streaming.server import StreamingServer


async def exec_(rt: Runtime, request: cri.ExecRequest) -> cri.ExecResponse:
    if not request.cmd:
        raise InvalidArgument("exec command must not be empty")
    _check_stdio(request.container_id, request.tty, request.stdin, request.stdout,
                 request.stderr)
    pod, container, backend = _running(rt, request.container_id)
    from criserver.runtime.streaming.remotecommand import StdioRequest

    url = (await _server(rt)).prepare(StdioRequest(
        "exec", backend, pod, container, tuple(request.cmd), tty=request.tty,
        stdin=request.stdin, stdout=request.stdout, stderr=request.stderr))
    return cri.ExecResponse(url=url)


async def attach(rt: Runtime, request: cri.AttachRequest) -> cri.AttachResponse:
    _check_stdio(request.container_id, request.tty, request.stdin, request.stdout,
                 request.stderr)
    pod, container, backend = _running(rt, request.container_id)
    from criserver.runtime.streaming.remotecommand import StdioRequest

    url = (await _server(rt)).prepare(StdioRequest(
        "attach", backend, pod, container, tty=request.tty, stdin=request.stdin,
        stdout=request.stdout, stderr=request.stderr))
    return cri.AttachResponse(url=url)


async def port_forward(rt: Runtime, request: cri.PortForwardRequest) -> cri.PortForwardResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("missing required pod_sandbox_id")
    for port in request.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port} is not a valid TCP port")
    pod = rt.pods.get(request.pod_sandbox_id)
    if pod.state != PodState.READY:
        raise FailedPrecondition(f"pod sandbox {pod.id} is not ready")
    from criserver.runtime.streaming.portforward import PortForwardRequest

    server = await _server(rt)
    url = server.prepare(PortForwardRequest(_backend(rt, pod), pod, tuple(request.port)))
    return cri.PortForwardResponse(url=url)


def _check_stdio(container_id: str, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if not container_id:
        raise InvalidArgument("missing required container_id")
    if tty and stderr:
        # A terminal has one output stream: there is nothing to send on stderr.
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")


def _running(rt: Runtime, container_id: str) -> tuple[PodRecord, ContainerRecord,
                                                       SandboxBackend]:
    container = rt.containers.get(container_id)
    if container.state != ContainerState.RUNNING:
        raise FailedPrecondition(f"container {container.id} is not running")
    pod = rt.pods.get(container.pod_id)
    return pod, container, _backend(rt, pod)


def _backend(rt: Runtime, pod: PodRecord) -> SandboxBackend:
    backend = rt.backend(pod)
    if not backend.features.streaming:
        raise Unimplemented(f"runtime handler {pod.runtime_handler!r} does not support "
                            "exec, attach or port-forward")
    return backend


async def _server(rt: Runtime) -> StreamingServer:
    if rt.streaming is None:
        raise Unavailable("the streaming server is not running")
    return await rt.streaming.server()
