"""The daemon's trace mode (`[daemon] trace = true`, issue 16): each lifecycle call in TRACED
logs one line with its total and the time of each step, the host's own (lock, store,
image_lookup, spec, ...) and, per agent call, its round trip seen from the host
(`agent.<Call>`) and the agent's steps inside it (`guest.<Call>.<step>`). Steps are recorded
with `span` (vmagent.steps, shared with the agent); off, a span is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from vmagent.steps import Steps, current, recording, span

__all__ = ["TRACED", "Steps", "span", "timed_entry", "traced"]

log = logging.getLogger("criserver.trace")
T = TypeVar("T")

TRACED = frozenset({"RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer",
                    "RemoveContainer", "StopPodSandbox", "RemovePodSandbox"})


async def traced(rpc: str, subject: str, call: Awaitable[T]) -> T:
    """Await `call` with a fresh step recorder and log its trace line, failed or not:
    `trace rpc=<rpc><subject> code=OK|<error> total_ms=.. <step>=<ms> ...`."""
    steps = Steps()
    started = time.perf_counter()
    code = "OK"
    try:
        with recording(steps):
            return await call
    except BaseException as exc:
        code = type(exc).__name__
        raise
    finally:
        total = (time.perf_counter() - started) * 1000
        parts = " ".join(f"{name}={ms:.2f}" for name, ms in steps.ms.items())
        log.info("trace rpc=%s%s code=%s total_ms=%.2f %s", rpc, subject, code, total, parts)


def timed_entry(name: str,
                cm: AbstractAsyncContextManager[T]) -> AbstractAsyncContextManager[T]:
    """`cm`, the time to enter it (a lock's wait) recorded as step `name`; `cm` itself when
    nothing is recorded."""
    return cm if current() is None else _timed_entry(name, cm)


@contextlib.asynccontextmanager
async def _timed_entry(name: str, cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    async with contextlib.AsyncExitStack() as stack:
        with span(name):
            value = await stack.enter_async_context(cm)
        yield value
