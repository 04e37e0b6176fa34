"""RemoveContainer: stop it if running, remove it; an unknown container is already removed."""

from __future__ import annotations

import logging

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import NotFound
from criserver.runtime.container_stop import stop_running
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerRecord, PodRecord

log = logging.getLogger(__name__)


async def remove_container(
    rt: Runtime, request: cri.RemoveContainerRequest
) -> cri.RemoveContainerResponse:
    try:
        container = rt.containers.get(request.container_id)
    except NotFound:
        log.info("remove of unknown container container=%s: already gone", request.container_id)
        return cri.RemoveContainerResponse()
    pod = rt.pods.get(container.pod_id)
    async with rt.container_call(pod.id, container.id):
        container_now = rt.containers.find(container.id)
        if container_now is not None:  # else removed while we waited for the lock
            pod = rt.pods.get(pod.id)
            await remove_container_record(rt, pod, container_now)
    return cri.RemoveContainerResponse()


async def remove_container_record(rt: Runtime, pod: PodRecord, container: ContainerRecord) -> None:
    """Remove one container, killing it first if it still runs (caller holds
    `Runtime.container_call` or the pod alone)."""
    await stop_running(rt, pod, container, 0)
    await rt.backend(pod).remove_container(pod, container)
    await rt.transitions.remove_container(pod, container)
    rt.images_released(container)
    log.info("container removed container=%s pod=%s", container.id, pod.id)
