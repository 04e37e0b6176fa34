"""StopPodSandbox: stop every container and the sandbox itself; idempotent."""

from __future__ import annotations

import logging

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import NotFound
from criserver.runtime import exit_codes
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerState, PodRecord, PodState
from criserver.trace import timed_entry

log = logging.getLogger(__name__)


async def stop_pod_sandbox(
    rt: Runtime, request: cri.StopPodSandboxRequest
) -> cri.StopPodSandboxResponse:
    try:
        pod = rt.pods.get(request.pod_sandbox_id)
    except NotFound:
        # The CRI asks for no error once everything is reclaimed: an unknown pod has nothing.
        log.info("stop of unknown pod pod=%s: nothing to do", request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()
    async with timed_entry("lock", rt.pod_locks.exclusive(pod.id)):
        await stop_pod(rt, pod)
    return cri.StopPodSandboxResponse()


async def stop_pod(rt: Runtime, pod: PodRecord) -> PodRecord:
    """Stop the pod (caller holds its lock). Safe to call on a stopped pod."""
    pod = rt.pods.find(pod.id) or pod
    if pod.state == PodState.INIT:
        return pod
    await rt.backend(pod).stop_sandbox(pod)
    for container in rt.containers.of_pod(pod.id):
        if container.state in (ContainerState.CREATED, ContainerState.RUNNING,
                               ContainerState.UNKNOWN):
            await rt.transitions.container_exited(container.id, exit_codes.pod_stopped())
    return await rt.transitions.pod_not_ready(pod.id)
