"""A test double backend: sandboxes and containers that exist only as records.

Loaded by import path (`tests.backends.inert:InertBackend`), exactly as a third-party backend
would be, to test the daemon's CRI state semantics without booting VMs. It proves nothing about
running pods; the micro-VM tests do that.
"""

from __future__ import annotations

import time
from typing import Any

from criserver.runtime.backend import (
    BackendStatus,
    BaseBackend,
    ContainerCreated,
    SandboxStarted,
)
from criserver.runtime.undo import UndoStack
from criserver.store.records import ContainerRecord, PodRecord


class InertBackend(BaseBackend):
    name = "inert"

    async def status(self) -> BackendStatus:
        return BackendStatus(runtime_ready=True, network_ready=True, info={"backend": "inert"})

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        if pod.config.annotations.get("test/fail-run"):
            raise RuntimeError("asked to fail")
        return SandboxStarted(ips=("10.0.0.1",), backend={"started": time.time_ns()})

    async def stop_sandbox(self, pod: PodRecord) -> None:
        return None

    async def remove_sandbox(self, pod: PodRecord) -> None:
        return None

    async def sandbox_info(self, pod: PodRecord) -> dict[str, Any]:
        return {"inert": True}

    async def create_container(
        self, pod: PodRecord, container: ContainerRecord, undo: UndoStack
    ) -> ContainerCreated:
        sc = container.config.linux.security_context
        # Echoes what a real backend resolves: the image volumes' ids and the user.
        return ContainerCreated(
            image_id=f"sha256:{'0' * 64}", image_ref=container.config.image.image,
            volume_images={m.container_path: m.image.image for m in container.config.mounts
                           if m.image.image},
            user=(sc.run_as_user.value, sc.run_as_user.value, tuple(sc.supplemental_groups))
            if sc.HasField("run_as_user") else None,
        )

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        return time.time_ns()

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        await self.context.events.container_exited(container.id, 0, "Completed", "", time.time_ns())

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        return None
