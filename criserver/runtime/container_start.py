"""StartContainer: only a CREATED container in a READY pod can start."""

from __future__ import annotations

import asyncio
import logging

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import FailedPrecondition
from criserver.runtime import exit_codes
from criserver.runtime.container_log import ContainerLog, check_inside
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerState, PodState

log = logging.getLogger(__name__)


async def start_container(
    rt: Runtime, request: cri.StartContainerRequest
) -> cri.StartContainerResponse:
    container = rt.containers.get(request.container_id)
    pod = rt.pods.get(container.pod_id)
    async with rt.container_call(pod.id, container.id):
        container = rt.containers.get(container.id)
        pod = rt.pods.get(pod.id)
        if container.state != ContainerState.CREATED:
            raise FailedPrecondition(
                f"container {container.id} is {container.state}, only a created container can start"
            )
        if pod.state != PodState.READY:
            raise FailedPrecondition(
                f"pod sandbox {pod.id} of container {container.id} is not ready"
            )
        if container.log_path:
            await _create_log(container.log_path, pod.config.log_directory)
        try:
            started_at = await rt.backend(pod).start_container(pod, container)
        except Exception as exc:
            await rt.transitions.container_exited(container.id, exit_codes.start_failed(exc))
            raise
        await rt.transitions.container_started(container.id, started_at)
    log.info("container started container=%s pod=%s", container.id, pod.id)
    return cri.StartContainerResponse()


async def _create_log(path: str, directory: str) -> None:
    """The CRI log file exists from StartContainer on, empty until the container writes (as
    containerd makes it): kubelet, `crictl logs` and critest open it as soon as the container
    runs, and a container that never writes has an empty log, not none. The backend appends.

    :raises Internal: the file cannot be created.
    :raises FailedPrecondition: a symbolic link leads it out of the pod's log `directory`.
    """
    await asyncio.to_thread(check_inside, path, directory)
    log_file = ContainerLog(path)
    await log_file.open()
    await log_file.close()
