"""An inert backend whose runtime and network are not ready, to see Status count every handler."""

from __future__ import annotations

from criserver.runtime.backend import BackendStatus
from tests.backends.inert import InertBackend


class UnreadyBackend(InertBackend):
    name = "unready"

    async def status(self) -> BackendStatus:
        return BackendStatus(runtime_ready=False, runtime_reason="GuestAssetsMissing",
                             runtime_message="no kernel", network_ready=False,
                             network_reason="NetworkPluginNotReady", network_message="no CNI",
                             info={"backend": "unready"})
