"""RemovePodSandbox: stop if needed, remove containers and everything on disk; idempotent."""

from __future__ import annotations

import logging

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import NotFound
from criserver.runtime.container_remove import remove_container_record
from criserver.runtime.runtime import Runtime
from criserver.runtime.sandbox_stop import stop_pod
from criserver.trace import timed_entry

log = logging.getLogger(__name__)


async def remove_pod_sandbox(
    rt: Runtime, request: cri.RemovePodSandboxRequest
) -> cri.RemovePodSandboxResponse:
    try:
        pod = rt.pods.get(request.pod_sandbox_id)
    except NotFound:
        log.info("remove of unknown pod pod=%s: already gone", request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()
    async with timed_entry("lock", rt.pod_locks.exclusive(pod.id)):
        if rt.pods.find(pod.id) is None:  # removed while we waited for the lock
            return cri.RemovePodSandboxResponse()
        pod = await stop_pod(rt, pod)
        backend = rt.backend(pod)
        # Holding the pod alone, no container lifecycle call runs: no container lock needed.
        for container in rt.containers.of_pod(pod.id):
            await remove_container_record(rt, pod, container)
        await backend.remove_sandbox(pod)
        await rt.transitions.remove_pod(pod)
    log.info("pod removed pod=%s", pod.id)
    return cri.RemovePodSandboxResponse()
