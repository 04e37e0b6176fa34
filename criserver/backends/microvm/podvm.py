"""One pod's live VM as the backend holds it: the QEMU process, the agent client, and the
watcher that turns VM events into sandbox state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from criserver.backends.microvm.channel import AgentClient
from criserver.errors import Unavailable
from criserver.vm.vm import VM, EventKind, VMEvent
from vmagent.api import agent_pb2 as pb

log = logging.getLogger(__name__)

# What the pod's state says when its VM ends without being asked to.
EXIT_REASONS = {
    EventKind.GUEST_PANICKED: ("GuestPanicked", "the guest kernel panicked"),
    EventKind.SHUTDOWN: ("GuestShutdown", "the guest shut down"),
    EventKind.EXITED: ("VMExited", "the QEMU process exited"),
}

OnExit = Callable[[str, str, str], Awaitable[None]]


@dataclass
class PodVM:
    pod_id: str
    vm: VM
    agent: AgentClient
    # Set before a requested stop, so the watcher does not report the exit as a failure.
    stopping: bool = False
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    async def wait_ready(self, deadline: float) -> pb.CheckResponse:
        """The agent's first answer (see AgentClient.wait_ready), or Unavailable as soon as
        the VM ends: a guest that panics at boot must not cost the whole boot timeout."""
        ready = asyncio.ensure_future(self.agent.wait_ready(deadline))
        gone = asyncio.ensure_future(self.vm.wait_exited())
        try:
            await asyncio.wait({ready, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if not ready.cancelled():
            return ready.result()  # answered, or its own error (deadline, broken agent)
        ended = [e for e in self.vm.recent_events if e.kind in EXIT_REASONS]
        first = min(ended, key=lambda e: list(EXIT_REASONS).index(e.kind), default=None)
        _, message = EXIT_REASONS[first.kind if first else EventKind.EXITED]
        detail = first.data.get("reason") if first else None
        raise Unavailable(f"the VM ended before its agent answered: {message}"
                          + (f" ({detail})" if detail else ""))

    def watch(self, on_exit: OnExit) -> None:
        self._watcher = asyncio.create_task(self._watch(on_exit), name=f"watch-{self.pod_id}")

    async def _watch(self, on_exit: OnExit) -> None:
        async for event in self.vm.events():
            if event.kind in EXIT_REASONS:
                await self._report(event, on_exit)
                return

    async def _report(self, event: VMEvent, on_exit: OnExit) -> None:
        if self.stopping:
            return
        reason, message = EXIT_REASONS[event.kind]
        detail = event.data.get("reason")
        log.warning("pod vm ended pod=%s event=%s detail=%s", self.pod_id, event.kind, detail)
        self.agent.close()
        try:
            await on_exit(self.pod_id, reason, f"{message}" + (f" ({detail})" if detail else ""))
        except Exception:
            log.exception("reporting the end of the vm failed pod=%s", self.pod_id)

    async def close(self) -> None:
        """Stop watching and let go of the VM; QEMU keeps running (daemon shutdown)."""
        self.agent.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.vm.detach()
