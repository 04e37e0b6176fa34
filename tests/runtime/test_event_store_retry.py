"""A backend's report (an exit, a start found at restart, a pod's end) comes once: when the
store cannot take it (the database read-only, its disk full) the sink retries it until it can,
rather than drop it and list the container running for good (issue 18, the read-only store)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from criserver.runtime.runtime import BackendEventSink
from criserver.store.db import StoreUnavailable


class FlakyTransitions:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.recorded: list[tuple[str, Any]] = []

    async def exit_reported(self, container_id: str, exit: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the daemon's store /x/criserver.db cannot be written")
        self.recorded.append((container_id, exit))


async def test_an_exit_the_store_refuses_is_retried_until_recorded() -> None:
    transitions = FlakyTransitions(failures=3)
    sink = BackendEventSink(SimpleNamespace(transitions=transitions))  # type: ignore[arg-type]
    sink.retry_delay = 0.01
    await asyncio.wait_for(sink.container_exited("c1", 137, "Error", "", 5), 5)
    assert [(cid, e.code) for cid, e in transitions.recorded] == [("c1", 137)]
    assert transitions.failures == 0
