"""The runtime's shared state: stores, backends, events and locks, handed to each RPC module.

State changes that have several causes (a stop asked by kubelet, a VM that died) go through the
transition helpers here, so every path updates the store and publishes the same CRI event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import Config
from criserver.errors import InvalidArgument
from criserver.image.service import ImageService
from criserver.runtime import exit_codes
from criserver.runtime.backend import SandboxBackend
from criserver.runtime.events import EventBroadcaster
from criserver.runtime.locks import KeyedLock
from criserver.runtime.streaming.lazy import LazyStreaming
from criserver.store.db import Database
from criserver.store.objects import ContainerStore, PodStore
from criserver.store.records import (
    ContainerExit,
    ContainerRecord,
    ContainerState,
    PodRecord,
    PodState,
)

log = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        config: Config,
        db: Database,
        backends: dict[str, SandboxBackend],
        images: ImageService | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.pods = PodStore(db)
        self.containers = ContainerStore(db)
        self.backends = backends
        self.events = EventBroadcaster()
        self.pod_locks = KeyedLock()
        self.container_locks = KeyedLock()
        self.settings: dict[str, str] = {}
        self.images = images
        self.streaming: LazyStreaming | None = None
        # Exits the backend reported while StartContainer had not yet recorded RUNNING.
        self.early_exits: dict[str, ContainerExit] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        await self.pods.load()
        await self.containers.load(self.pods)
        rows = await self.db.read(lambda c: c.execute("SELECT key, value FROM settings").fetchall())
        self.settings = dict(rows)

    async def save_setting(self, key: str, value: str) -> None:
        await self.db.write(
            lambda c: c.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
        )
        self.settings[key] = value

    def image_in_use(self, image_id: str) -> bool:
        """A container runs from it or mounts it as an image volume."""
        return any(c.uses_image(image_id) for c in self.containers.all())

    def images_released(self, container: ContainerRecord) -> None:
        """`container` is gone: collect the content of its images (root and volumes) that were
        removed while in use (RemoveImage keeps the content of images containers still use)."""
        if self.images is None:
            return
        for image_id in {container.image_id, *container.volume_images.values()}:
            if (not image_id or self.image_in_use(image_id)
                    or self.images.get(image_id) is not None):
                continue
            task = asyncio.create_task(self.images.gc(), name=f"image-gc-{image_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return  # one collection covers them all

    def handler_name(self, requested: str) -> str:
        name = requested or self.config.runtime.default_handler
        if name not in self.backends:
            raise InvalidArgument(
                f"runtime handler {name!r} is not configured (configured: "
                f"{', '.join(sorted(self.backends))})"
            )
        return name

    def backend(self, pod: PodRecord) -> SandboxBackend:
        return self.backends[pod.runtime_handler]

    # -- events --------------------------------------------------------------------------

    def publish(self, subject_id: str, kind: int, pod: PodRecord | None) -> None:
        """One CRI event; `subject_id` is a container, or the pod itself for pod events."""
        event = cri.ContainerEventResponse(
            container_id=subject_id,
            container_event_type=kind,  # type: ignore[arg-type]
            created_at=time.time_ns(),
        )
        if pod is not None:
            event.pod_sandbox_status.CopyFrom(pod.to_cri_status())
            event.containers_statuses.extend(
                c.to_cri_status() for c in self.containers.of_pod(pod.id)
                if c.state != ContainerState.INIT
            )
        self.events.publish(event)

    # -- transitions with several causes --------------------------------------------------

    async def mark_pod_notready(
        self, pod: PodRecord, reason: str = "", message: str = ""
    ) -> PodRecord:
        changed = False

        def change(p: PodRecord) -> PodRecord:
            nonlocal changed
            if p.state == PodState.NOTREADY:
                return p  # not ready already: the first cause stands
            changed = True
            return replace(p, state=PodState.NOTREADY, reason=reason, message=message)

        pod = await self.pods.update(pod.id, change)
        if not changed:
            return pod
        self.publish(pod.id, cri.CONTAINER_STOPPED_EVENT, pod)
        log.info("pod not ready pod=%s reason=%s %s", pod.id, reason or "stopped", message)
        return pod

    async def mark_container_exited(
        self, container: ContainerRecord, exit: ContainerExit
    ) -> ContainerRecord:
        finished = exit.finished_at or time.time_ns()
        changed = False

        def change(c: ContainerRecord) -> ContainerRecord:
            nonlocal changed
            if c.state == ContainerState.EXITED:
                return c  # exited already: the first report stands
            changed = True
            return replace(c, state=ContainerState.EXITED, exit_code=exit.code,
                           reason=exit.reason, message=exit.message, finished_at=finished)

        container = await self.containers.update(container.id, change)
        if not changed:
            return container
        self.publish(container.id, cri.CONTAINER_STOPPED_EVENT, self.pods.find(container.pod_id))
        log.info("container exited container=%s pod=%s exit_code=%d reason=%s",
                 container.id, container.pod_id, exit.code, exit.reason)
        return container


class BackendEventSink:
    """The `BackendEvents` a backend reports to: turns them into the transitions above."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def sandbox_exited(self, pod_id: str, reason: str, message: str) -> None:
        rt = self._runtime
        pod = rt.pods.find(pod_id)
        if pod is None:
            return
        for container in rt.containers.of_pod(pod_id):
            if container.state in (ContainerState.CREATED, ContainerState.RUNNING,
                                   ContainerState.UNKNOWN):
                await rt.mark_container_exited(container, exit_codes.sandbox_gone(reason, message))
        if pod.state == PodState.READY:
            await rt.mark_pod_notready(pod, reason, message)

    async def container_exited(
        self, container_id: str, exit_code: int, reason: str, message: str, finished_at: int
    ) -> None:
        exit = ContainerExit(exit_code, reason, message, finished_at)
        container = self._runtime.containers.find(container_id)
        if container is None:
            return
        if container.state == ContainerState.CREATED:
            # It started and exited before StartContainer recorded it as running.
            self._runtime.early_exits[container_id] = exit
        elif container.state in (ContainerState.RUNNING, ContainerState.UNKNOWN):
            await self._runtime.mark_container_exited(container, exit)


def info_json(value: Any) -> str:
    """A verbose `info` map value: JSON, as crictl prints it."""
    return json.dumps(value, sort_keys=True, default=str)
