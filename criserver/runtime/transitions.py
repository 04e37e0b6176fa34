"""Every change of a pod's or container's record, and the CRI event kubelet sees for it.

Nothing else writes the pod and container stores: each method persists through the store (which
checks the state transition) and then publishes the matching ContainerEventResponse, so a change
and its event can never be paired differently by two callers. Changes with several causes (a
stop asked by kubelet, a VM that died) apply once: the first cause stands, one event is sent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import NotFound
from criserver.runtime.backend import ContainerCreated, SandboxStarted
from criserver.runtime.events import EventBroadcaster
from criserver.store.objects import ContainerStore, PodStore
from criserver.store.records import (
    ContainerExit,
    ContainerRecord,
    ContainerState,
    PodRecord,
    PodState,
)

log = logging.getLogger(__name__)


class Transitions:
    def __init__(self, pods: PodStore, containers: ContainerStore,
                 events: EventBroadcaster) -> None:
        self.pods = pods
        self.containers = containers
        self.events = events

    # -- pods ------------------------------------------------------------------------------

    async def add_pod(self, pod: PodRecord) -> None:
        """Persist a pod being created (INIT: not listed, no event yet)."""
        await self.pods.add(pod)

    async def pod_ready(self, pod_id: str, started: SandboxStarted) -> PodRecord:
        pod = await self.pods.update(pod_id, lambda p: replace(
            p, state=PodState.READY, ips=started.ips, backend=started.backend))
        self._publish(pod.id, cri.CONTAINER_CREATED_EVENT, pod)
        self._publish(pod.id, cri.CONTAINER_STARTED_EVENT, pod)
        return pod

    async def pod_setup_failed(self, pod_id: str, message: str) -> PodRecord:
        """RunPodSandbox failed and left something behind: kept (never listed as created, so
        no event) for RemovePodSandbox to retry the cleanup."""
        return await self.pods.update(pod_id, lambda p: replace(
            p, state=PodState.NOTREADY, reason="SetupFailed", message=message))

    async def pod_not_ready(self, pod_id: str, reason: str = "", message: str = "") -> PodRecord:
        changed = False

        def change(p: PodRecord) -> PodRecord:
            nonlocal changed
            if p.state == PodState.NOTREADY:
                return p  # not ready already: the first cause stands
            changed = True
            return replace(p, state=PodState.NOTREADY, reason=reason, message=message)

        pod = await self.pods.update(pod_id, change)
        if changed:
            self._publish(pod.id, cri.CONTAINER_STOPPED_EVENT, pod)
            log.info("pod not ready pod=%s reason=%s %s", pod.id, reason or "stopped", message)
        return pod

    async def drop_pod(self, pod_id: str) -> None:
        """Forget a pod whose creation failed cleanly: it was never announced."""
        await self.pods.delete(pod_id)

    async def remove_pod(self, pod: PodRecord) -> None:
        await self.pods.delete(pod.id)
        self.pods.names.release(pod.name_key, pod.id)
        self._publish(pod.id, cri.CONTAINER_DELETED_EVENT, pod)

    # -- containers ------------------------------------------------------------------------

    async def add_container(self, container: ContainerRecord) -> None:
        """Persist a container being created (INIT: not listed, no event yet)."""
        await self.containers.add(container)

    async def container_created(self, container_id: str,
                                created: ContainerCreated) -> ContainerRecord:
        container = await self.containers.update(container_id, lambda c: replace(
            c, state=ContainerState.CREATED, image_id=created.image_id,
            image_ref=created.image_ref, backend=created.backend,
            volume_images=created.volume_images, user=created.user))
        self._publish_container(container, cri.CONTAINER_CREATED_EVENT)
        return container

    async def container_create_failed(self, container_id: str, message: str) -> None:
        """CreateContainer failed and left something behind: kept (UNKNOWN, never announced)
        for RemoveContainer to retry the cleanup."""
        await self.containers.update(container_id, lambda c: replace(
            c, state=ContainerState.UNKNOWN, reason="CreateFailed", message=message))

    async def drop_container(self, container_id: str) -> None:
        """Forget a container whose creation failed cleanly: it was never announced."""
        await self.containers.delete(container_id)

    async def container_started(self, container_id: str, started_at: int) -> ContainerRecord:
        """Record RUNNING, then any exit the backend reported before this could."""
        container = await self.containers.update(container_id, lambda c: replace(
            c, state=ContainerState.RUNNING, started_at=started_at))
        self._publish_container(container, cri.CONTAINER_STARTED_EVENT)
        if container.early_exit is not None:
            container = await self.container_exited(container_id, container.early_exit)
        return container

    async def container_exited(self, container_id: str, exit: ContainerExit) -> ContainerRecord:
        finished = exit.finished_at or time.time_ns()
        changed = False

        def change(c: ContainerRecord) -> ContainerRecord:
            nonlocal changed
            if c.state == ContainerState.EXITED:
                return c  # exited already: the first report stands
            changed = True
            return replace(c, state=ContainerState.EXITED, exit_code=exit.code,
                           reason=exit.reason, message=exit.message, finished_at=finished,
                           early_exit=None)

        container = await self.containers.update(container_id, change)
        if changed:
            self._publish_container(container, cri.CONTAINER_STOPPED_EVENT)
            log.info("container exited container=%s pod=%s exit_code=%d reason=%s",
                     container.id, container.pod_id, exit.code, exit.reason)
        return container

    async def exit_reported(self, container_id: str, exit: ContainerExit) -> None:
        """The backend saw the process end: an exit now, or kept for StartContainer if it has
        not yet recorded the container as running."""
        def keep_if_created(c: ContainerRecord) -> ContainerRecord:
            return replace(c, early_exit=exit) if c.state == ContainerState.CREATED else c

        # The state is checked and the exit kept in one store update: StartContainer records
        # RUNNING through the same store, so the exit is either kept for it or applied here.
        # (Not under the container's CRI lock: StartContainer and StopContainer hold it while
        # the backend runs, and a backend may report the exit before those calls return.)
        try:
            container = await self.containers.update(container_id, keep_if_created)
        except NotFound:
            return  # removed meanwhile
        if container.state in (ContainerState.RUNNING, ContainerState.UNKNOWN):
            await self.container_exited(container_id, exit)

    async def resources_updated(self, container_id: str,
                                resources: cri.LinuxContainerResources) -> None:
        def with_resources(c: ContainerRecord) -> ContainerRecord:
            config = cri.ContainerConfig()
            config.CopyFrom(c.config)
            config.linux.resources.CopyFrom(resources)
            return replace(c, config=config)

        await self.containers.update(container_id, with_resources)

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        await self.containers.delete(container.id)
        self.containers.names.release(container.name_key(pod), container.id)
        self._publish_container(container, cri.CONTAINER_DELETED_EVENT, pod)

    # -- events ----------------------------------------------------------------------------

    def _publish_container(self, container: ContainerRecord, kind: int,
                           pod: PodRecord | None = None) -> None:
        # The pod as it is now: a container event also tells kubelet how its pod is.
        self._publish(container.id, kind, self.pods.find(container.pod_id) or pod)

    def _publish(self, subject_id: str, kind: int, pod: PodRecord | None) -> None:
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
