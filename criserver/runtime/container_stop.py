"""StopContainer: signal, wait for the grace period, then kill; idempotent once stopped, and
an unknown container is stopped already."""

from __future__ import annotations

import logging

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import NotFound
from criserver.runtime import exit_codes
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerRecord, ContainerState, PodRecord

log = logging.getLogger(__name__)


async def stop_container(
    rt: Runtime, request: cri.StopContainerRequest
) -> cri.StopContainerResponse:
    try:
        container = rt.containers.get(request.container_id)  # an empty ID is still refused
    except NotFound:
        # The CRI: no error once the container is stopped, and one that is gone is.
        log.info("stop of unknown container container=%s: nothing to do", request.container_id)
        return cri.StopContainerResponse()
    pod = rt.pods.get(container.pod_id)
    async with rt.container_call(pod.id, container.id):
        current = rt.containers.find(container.id)
        if current is not None:  # else removed while we waited for the lock
            pod = rt.pods.get(pod.id)
            await stop_running(rt, pod, current, max(request.timeout, 0))
    return cri.StopContainerResponse()


async def stop_running(
    rt: Runtime, pod: PodRecord, container: ContainerRecord, timeout: float
) -> None:
    """Stop `container` if it runs (caller holds `Runtime.container_call` or the pod alone);
    as containerd, a created or exited container is left as it is."""
    if container.state not in (ContainerState.RUNNING, ContainerState.UNKNOWN):
        return
    # The backend normally reports the exit itself, through BackendEvents.container_exited.
    await rt.backend(pod).stop_container(pod, container, timeout)
    current = rt.containers.find(container.id)
    if current is not None and current.state != ContainerState.EXITED:
        await rt.transitions.container_exited(current.id, exit_codes.stop_unreported())
