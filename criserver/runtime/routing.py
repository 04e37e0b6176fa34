"""Which runtime handler serves a pod: the one its RunPodSandbox names, else the one the
configuration routes its kind of pod to (node namespaces, privileged), else the default.

Decided once, at RunPodSandbox, from the pod's config alone (kubelet and critest send no handler
for most pods: without a RuntimeClass `runtime_handler` is empty); a pod that names a handler is
never rerouted.
"""

from __future__ import annotations

from dataclasses import dataclass

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import RuntimeConfig


@dataclass(frozen=True)
class Route:
    handler: str
    reason: str = ""  # why the pod left the default handler (empty: named or default)


def route(config: RuntimeConfig, requested: str, pod: cri.PodSandboxConfig) -> Route:
    if requested:
        return Route(requested)
    security = pod.linux.security_context
    ns = security.namespace_options
    shared = [name for name, mode in (("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc))
              if mode == cri.NODE]
    if shared and config.host_namespaces_handler:
        return Route(config.host_namespaces_handler,
                     f"node namespaces ({', '.join(shared)}): runtime.host_namespaces_handler")
    if security.privileged and config.privileged_handler:
        return Route(config.privileged_handler, "privileged: runtime.privileged_handler")
    return Route(config.default_handler)
