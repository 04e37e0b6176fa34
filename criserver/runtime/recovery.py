"""Start-up recovery: hand each backend the pods it must re-adopt, then clean up what a daemon
that died mid-call left half-made.

The backend starts first: it must have loaded what it needs to find leftovers (a VM's state
dir, a pod's network) before it is asked to remove them. Each leftover's clean-up stands alone:
one that fails is logged and kept (INIT, never listed) for the next start, and the daemon
still starts.
"""

from __future__ import annotations

import logging

from criserver.runtime.backend import SandboxBackend
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerState, PodState

log = logging.getLogger(__name__)


async def recover(runtime: Runtime, handler: str, backend: SandboxBackend) -> None:
    pods = [p for p in runtime.pods.all() if p.runtime_handler == handler]
    half_made = [p for p in pods if p.state == PodState.INIT]
    made = [p for p in pods if p.state != PodState.INIT]
    made_ids = {p.id for p in made}
    containers = [c for c in runtime.containers.all() if c.pod_id in made_ids]
    await backend.start(made, [c for c in containers if c.state != ContainerState.INIT])
    for pod in half_made:
        log.warning("cleaning up pod interrupted during creation pod=%s", pod.id)
        try:
            await backend.remove_sandbox(pod)
        except Exception:
            log.exception("cleaning up interrupted pod failed, retried at next start pod=%s",
                          pod.id)
            continue
        await runtime.transitions.drop_pod(pod.id)
        runtime.pods.names.release(pod.name_key, pod.id)
    for container in [c for c in containers if c.state == ContainerState.INIT]:
        log.warning("cleaning up container interrupted during creation container=%s",
                    container.id)
        pod = runtime.pods.get(container.pod_id)
        try:
            await backend.remove_container(pod, container)
        except Exception:
            log.exception("cleaning up interrupted container failed, retried at next start "
                          "container=%s", container.id)
            continue
        await runtime.transitions.drop_container(container.id)
        runtime.containers.names.release(container.name_key(pod), container.id)
