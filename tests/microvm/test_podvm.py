"""PodVM.wait_ready: the agent's first answer, or a prompt failure once the VM has ended."""

from __future__ import annotations

import asyncio

import pytest

from criserver.backends.microvm.podvm import PodVM
from criserver.errors import DeadlineExceeded, Unavailable
from criserver.vm.vm import EventKind, VMEvent
from vmagent.api import agent_pb2 as pb


class BootingVM:
    def __init__(self, events: list[VMEvent] | None = None) -> None:
        self.ended = asyncio.Event()
        self.recent_events: tuple[VMEvent, ...] = tuple(events or ())

    async def wait_exited(self, max_wait: float | None = None) -> bool:
        await self.ended.wait()
        return True


class SilentAgent:
    """An agent that answers after `delay` seconds (never, by default)."""

    def __init__(self, delay: float | None = None, error: Exception | None = None) -> None:
        self.delay = delay
        self.error = error
        self.cancelled = False

    async def wait_ready(self, deadline: float) -> pb.CheckResponse:
        try:
            if self.delay is None:
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay or 0)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return pb.CheckResponse(agent_instance_id="a1")


def _pod(vm: BootingVM, agent: SilentAgent) -> PodVM:
    return PodVM("p" * 64, vm, agent)  # type: ignore[arg-type]


async def test_a_guest_that_panics_at_boot_fails_the_wait_at_once() -> None:
    vm = BootingVM([VMEvent(EventKind.GUEST_PANICKED, "vm", {"action": "poweroff"}),
                    VMEvent(EventKind.SHUTDOWN, "vm", {"reason": "guest-panic"}),
                    VMEvent(EventKind.EXITED, "vm")])
    agent = SilentAgent()
    asyncio.get_running_loop().call_later(0.05, vm.ended.set)
    with pytest.raises(Unavailable, match="the guest kernel panicked"):
        async with asyncio.timeout(2):
            await _pod(vm, agent).wait_ready(deadline=0)
    assert agent.cancelled


async def test_the_agent_answer_or_its_error_is_returned_as_it_is() -> None:
    vm = BootingVM()
    reply = await _pod(vm, SilentAgent(delay=0.01)).wait_ready(deadline=0)
    assert reply.agent_instance_id == "a1"
    with pytest.raises(DeadlineExceeded):
        await _pod(vm, SilentAgent(delay=0, error=DeadlineExceeded("no answer"))).wait_ready(0)
