"""Container deletes a pod's guest finishes after RemoveContainer has answered.

RemoveContainer answers once the container is out of the daemon's records and its host-side
files are gone; what is left is inside the guest (unmounting the rootfs, removing the cgroup
and the OCI runtime's state: one agent round trip, ~25 ms in a warm guest and ~200 ms in a
new one under TCG). That runs here in the background, as containerd leaves a removed
container's snapshot to its garbage collector. The container cannot be reached any more
meanwhile: every CRI call looks it up in the records first.

A marker file per pending delete, written before RemoveContainer answers, makes the delete
outlive the daemon: the next start repeats it when it adopts the pod. A pod whose guest goes
(stopped, or its VM ended) drops its pending deletes: nothing of them outlives the guest.

A delete starts `DELAY` after its removal: a pod stopped right after (crictl rm, then stopp)
drops it before the guest has spent anything on it. Started at once, it made the stop wait
for the single vCPU it occupied (measured: stopp 124 -> 202 ms after a new pod's rm).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from criserver.errors import CriError

log = logging.getLogger(__name__)

# Deletes one container in a pod's guest: (pod_id, container_id).
GuestDelete = Callable[[str, str], Awaitable[None]]
DELAY = 1.0  # seconds


class GuestDeletes:
    def __init__(self, marker_dir: Callable[[str], Path], delete: GuestDelete,
                 delay: float = DELAY) -> None:
        """`marker_dir(pod_id)`: where the pod's pending deletes are recorded (inside the pod's
        state, so that removing the pod removes them)."""
        self._marker_dir = marker_dir
        self._delete = delete
        self._delay = delay
        self._tasks: dict[str, dict[str, asyncio.Task[None]]] = {}

    async def schedule(self, pod_id: str, container_id: str) -> None:
        """Record the delete, then start it; returns once it is recorded."""
        await asyncio.to_thread(_touch, self._marker_dir(pod_id) / container_id)
        self._start(pod_id, container_id)

    async def resume(self, pod_id: str) -> list[str]:
        """Start again the deletes an earlier daemon left pending in the pod (at adoption)."""
        pending = await asyncio.to_thread(_names, self._marker_dir(pod_id))
        for container_id in pending:
            log.info("guest delete resumed container=%s pod=%s", container_id, pod_id)
            self._start(pod_id, container_id)
        return pending

    def pending(self, pod_id: str) -> list[str]:
        """The containers whose delete is still running in this daemon."""
        return sorted(self._tasks.get(pod_id, {}))

    async def drop(self, pod_id: str) -> None:
        """The pod's guest is going with all it holds: its pending deletes stop."""
        tasks = self._tasks.pop(pod_id, {})
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        """Daemon shutdown: the markers stay for the next start."""
        for pod_id in list(self._tasks):
            await self.drop(pod_id)

    def _start(self, pod_id: str, container_id: str) -> None:
        tasks = self._tasks.setdefault(pod_id, {})
        if container_id not in tasks:
            tasks[container_id] = asyncio.create_task(
                self._run(pod_id, container_id), name=f"guest-delete-{container_id[:12]}")

    async def _run(self, pod_id: str, container_id: str) -> None:
        try:
            await asyncio.sleep(self._delay)
            await self._delete(pod_id, container_id)
        except CriError as exc:
            log.warning("guest delete failed, repeated at the next daemon start container=%s "
                        "pod=%s: %s", container_id, pod_id, exc.message)
            return
        except Exception:
            log.exception("guest delete failed, repeated at the next daemon start "
                          "container=%s pod=%s", container_id, pod_id)
            return
        finally:
            tasks = self._tasks.get(pod_id, {})
            if tasks.get(container_id) is asyncio.current_task():
                del tasks[container_id]
                if not tasks:
                    del self._tasks[pod_id]
        await asyncio.to_thread(_unlink, self._marker_dir(pod_id) / container_id)


def _touch(marker: Path) -> None:
    marker.parent.mkdir(exist_ok=True)
    marker.touch()


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _unlink(marker: Path) -> None:
    marker.unlink(missing_ok=True)
