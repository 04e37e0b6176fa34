"""UpdateContainerResources and ReopenContainerLog."""

from __future__ import annotations

import asyncio

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import FailedPrecondition
from criserver.runtime.container_log import check_inside
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerState


async def update_container_resources(
    rt: Runtime, request: cri.UpdateContainerResourcesRequest
) -> cri.UpdateContainerResourcesResponse:
    container = rt.containers.get(request.container_id)
    pod = rt.pods.get(container.pod_id)
    async with rt.container_call(pod.id, container.id):
        container = rt.containers.get(container.id)
        pod = rt.pods.get(pod.id)
        if container.state not in (ContainerState.CREATED, ContainerState.RUNNING):
            raise FailedPrecondition(f"container {container.id} is {container.state}")
        await rt.backend(pod).update_container_resources(pod, container, request.linux)
        await rt.transitions.resources_updated(container.id, request.linux)
    return cri.UpdateContainerResourcesResponse()


async def reopen_container_log(
    rt: Runtime, request: cri.ReopenContainerLogRequest
) -> cri.ReopenContainerLogResponse:
    container = rt.containers.get(request.container_id)
    if container.state != ContainerState.RUNNING:
        raise FailedPrecondition(f"container {container.id} is not running")
    pod = rt.pods.get(container.pod_id)
    if container.log_path:
        # kubelet rotated the file: the path is checked again, as at StartContainer.
        await asyncio.to_thread(check_inside, container.log_path, pod.config.log_directory)
    await rt.backend(pod).reopen_container_log(pod, container)
    return cri.ReopenContainerLogResponse()
