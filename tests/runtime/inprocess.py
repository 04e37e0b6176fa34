"""An in-process Runtime (sqlite store in a temp dir) over a scripted backend, driven through
the same RPC functions the servicer calls, with every published CRI event recorded in order.

For tests of what the daemon decides on its own (exit codes, early exits, events) where the
backend's timing matters: the scripted backend reports exits exactly when a test says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import Config
from criserver.runtime import (
    container_create,
    container_remove,
    container_start,
    container_stop,
    sandbox_remove,
    sandbox_run,
    sandbox_stop,
)
from criserver.runtime.backend import BackendContext
from criserver.runtime.runtime import BackendEventSink, Runtime
from criserver.store.db import Database
from criserver.store.records import ContainerExit, ContainerRecord, PodRecord
from tests.backends.inert import InertBackend


class ScriptedBackend(InertBackend):
    """The inert backend, with exits reported (or not) when the test chooses."""

    def __init__(self, context: BackendContext) -> None:
        super().__init__({}, context)
        self.start_error: Exception | None = None
        self.exit_during_start: ContainerExit | None = None  # reported before start returns
        self.exit_on_stop: ContainerExit | None = ContainerExit(0, "Completed")

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        if self.start_error is not None:
            raise self.start_error
        if self.exit_during_start is not None:
            await self.report_exit(container.id, self.exit_during_start)
        return time.time_ns()

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        if self.exit_on_stop is not None:
            await self.report_exit(container.id, self.exit_on_stop)

    async def report_exit(self, container_id: str, exit: ContainerExit) -> None:
        await self.context.events.container_exited(
            container_id, exit.code, exit.reason, exit.message, exit.finished_at or 1)


class Events:
    """Every CRI event published, as (subject id, event type name) in order."""

    def __init__(self, rt: Runtime) -> None:
        self.received: list[cri.ContainerEventResponse] = []
        self._task = asyncio.create_task(self._collect(rt))

    async def _collect(self, rt: Runtime) -> None:
        async for event in rt.events.subscribe():
            self.received.append(event)

    async def all(self) -> list[cri.ContainerEventResponse]:
        await asyncio.sleep(0)  # let the collector drain the queue
        return list(self.received)

    async def names(self) -> list[tuple[str, str]]:
        return [(e.container_id, cri.ContainerEventType.Name(e.container_event_type))
                for e in await self.all()]

    async def close(self) -> None:
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


class InProcess:
    def __init__(self, rt: Runtime, backend: ScriptedBackend, events: Events) -> None:
        self.rt = rt
        self.backend = backend
        self.events = events

    async def run_pod(self, name: str = "pod") -> str:
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, namespace="ns", uid=f"uid-{name}"))
        response = await sandbox_run.run_pod_sandbox(
            self.rt, cri.RunPodSandboxRequest(config=config))
        return response.pod_sandbox_id

    async def create(self, pod_id: str, name: str = "c") -> str:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image="busybox"))
        response = await container_create.create_container(self.rt, cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config))
        return response.container_id

    async def start(self, container_id: str) -> None:
        await container_start.start_container(
            self.rt, cri.StartContainerRequest(container_id=container_id))

    async def stop(self, container_id: str) -> None:
        await container_stop.stop_container(
            self.rt, cri.StopContainerRequest(container_id=container_id, timeout=1))

    async def remove(self, container_id: str) -> None:
        await container_remove.remove_container(
            self.rt, cri.RemoveContainerRequest(container_id=container_id))

    async def stop_pod(self, pod_id: str) -> None:
        await sandbox_stop.stop_pod_sandbox(
            self.rt, cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    async def remove_pod(self, pod_id: str) -> None:
        await sandbox_remove.remove_pod_sandbox(
            self.rt, cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def container(self, container_id: str) -> ContainerRecord:
        return self.rt.containers.get(container_id)


@asynccontextmanager
async def in_process(db_path: Path, backend_class: type[ScriptedBackend] = ScriptedBackend
                     ) -> AsyncIterator[InProcess]:
    """A Runtime on the database at `db_path` (reopening the same path is a daemon restart),
    over a `backend_class` backend."""
    db = await Database.open(db_path)
    rt = Runtime(Config(), db, backends={})
    await rt.load()
    handler = rt.config.runtime.default_handler
    context = BackendContext(handler=handler, root=db_path.parent, state=db_path.parent,
                             config=rt.config, events=BackendEventSink(rt))
    backend = backend_class(context)
    rt.backends[handler] = backend
    events = Events(rt)
    await asyncio.sleep(0)  # subscribed before anything is published
    try:
        yield InProcess(rt, backend, events)
    finally:
        await events.close()
        await db.close()
