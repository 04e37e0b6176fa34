"""The runtime's shared state: stores, backends, events and locks, handed to each RPC module.

The stores are read here; every change to a pod or container goes through `transitions`, which
persists it and publishes its CRI event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import Config
from criserver.errors import InvalidArgument
from criserver.image.service import ImageService
from criserver.runtime import exit_codes, routing
from criserver.runtime.backend import DaemonShared, SandboxBackend
from criserver.runtime.events import EventBroadcaster
from criserver.runtime.locks import KeyedLock, KeyedSharedLock
from criserver.runtime.stragglers import Stragglers
from criserver.runtime.streaming.lazy import LazyStreaming
from criserver.runtime.transitions import Transitions
from criserver.store.db import Database, StoreUnavailable
from criserver.store.objects import ContainerStore, PodStore
from criserver.store.records import (
    ContainerExit,
    ContainerRecord,
    ContainerState,
    PodRecord,
    PodState,
)
from criserver.trace import timed_entry

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
        # What SandboxBackend promises: a pod's own lifecycle calls hold its lock alone, its
        # containers' lifecycle calls share it and hold their container's lock alone.
        self.pod_locks = KeyedSharedLock()
        self.container_locks = KeyedLock()
        self.settings: dict[str, str] = {}
        self.images = images
        self.streaming: LazyStreaming | None = None
        # What the daemon's VM and network users share (backends, the machine provider).
        self.shared = DaemonShared()
        self.transitions = Transitions(self.pods, self.containers, self.events)
        self._background: set[asyncio.Task[None]] = set()
        self.stats_stragglers = Stragglers("stats")

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

    def handler_for(self, requested: str, pod: cri.PodSandboxConfig) -> routing.Route:
        """The handler serving a new pod and why (criserver.runtime.routing), checked to
        exist."""
        chosen = routing.route(self.config.runtime, requested, pod)
        name = chosen.handler
        if chosen.reason:
            log.info("pod routed name=%s/%s handler=%s reason=%s", pod.metadata.namespace,
                     pod.metadata.name, name, chosen.reason)
        if name not in self.backends:
            raise InvalidArgument(
                f"runtime handler {name!r} is not configured (configured: "
                f"{', '.join(sorted(self.backends))})"
            )
        return chosen

    def backend(self, pod: PodRecord) -> SandboxBackend:
        return self.backends[pod.runtime_handler]

    @asynccontextmanager
    async def container_call(self, pod_id: str, container_id: str) -> AsyncIterator[None]:
        """Held by a container lifecycle call: the pod cannot stop or go meanwhile, and no
        other lifecycle call on this container runs; other containers' calls do. Pod first,
        container second, always."""
        async with timed_entry("lock", self.pod_locks.shared(pod_id)), \
                timed_entry("lock", self.container_locks.hold(container_id)):
            yield


class BackendEventSink:
    """The `BackendEvents` a backend reports to: turns them into transitions.

    A report comes once (a process exited, a VM died): when the store cannot take it (the
    database read-only, its disk full) it is retried until it can, not dropped, or the
    container would be listed running for good."""

    retry_delay = 1.0

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def _until_recorded(self, what: str, record: Callable[[], Awaitable[None]]) -> None:
        warned = False
        while True:
            try:
                await record()
            except StoreUnavailable as exc:
                if not warned:
                    log.warning("cannot record %s, retrying until the store takes it: %s",
                                what, exc.message)
                    warned = True
                await asyncio.sleep(self.retry_delay)
                continue
            if warned:
                log.info("recorded %s once the store took it", what)
            return

    async def sandbox_exited(self, pod_id: str, reason: str, message: str) -> None:
        await self._until_recorded(f"the end of pod={pod_id}",
                                   lambda: self._sandbox_exited(pod_id, reason, message))

    async def _sandbox_exited(self, pod_id: str, reason: str, message: str) -> None:
        rt = self._runtime
        pod = rt.pods.find(pod_id)
        if pod is None:
            return
        for container in rt.containers.of_pod(pod_id):
            if container.state in (ContainerState.CREATED, ContainerState.RUNNING,
                                   ContainerState.UNKNOWN):
                await rt.transitions.container_exited(
                    container.id, exit_codes.sandbox_gone(reason, message))
        if pod.state == PodState.READY:
            await rt.transitions.pod_not_ready(pod_id, reason, message)

    async def container_started(self, container_id: str, started_at: int) -> None:
        async def record() -> None:
            container = self._runtime.containers.find(container_id)
            if container is not None and container.state == ContainerState.CREATED:
                await self._runtime.transitions.container_started(container_id, started_at)

        await self._until_recorded(f"the start of container={container_id}", record)

    async def container_exited(
        self, container_id: str, exit_code: int, reason: str, message: str, finished_at: int
    ) -> None:
        async def record() -> None:
            await self._runtime.transitions.exit_reported(
                container_id, ContainerExit(exit_code, reason, message, finished_at))

        await self._until_recorded(f"the exit of container={container_id}", record)


def info_json(value: Any) -> str:
    """A verbose `info` map value: JSON, as crictl prints it."""
    return json.dumps(value, sort_keys=True, default=str)
