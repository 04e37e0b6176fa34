"""ExecSync: run a command in a running container and return its output and exit code."""

from __future__ import annotations

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerState

MAX_OUTPUT = 16 * 1024 * 1024  # per stream, as kubelet caps it


async def exec_sync(rt: Runtime, request: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
    if not request.cmd:
        raise InvalidArgument("exec command must not be empty")
    container = rt.containers.get(request.container_id)
    if container.state != ContainerState.RUNNING:
        raise FailedPrecondition(f"container {container.id} is not running")
    pod = rt.pods.get(container.pod_id)
    result = await rt.backend(pod).exec_sync(pod, container, list(request.cmd), request.timeout)
    return cri.ExecSyncResponse(
        stdout=result.stdout[:MAX_OUTPUT], stderr=result.stderr[:MAX_OUTPUT],
        exit_code=result.exit_code,
    )
