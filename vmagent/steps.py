"""Step timings of one call, for the daemon's trace mode (issue 16): a recorder installed for
the call, and `span(name)` blocks that add their wall time to it. With no recorder installed a
span is a shared no-op context: the code paths cost one ContextVar read when tracing is off.

Stdlib only, imported by both sides: the agent times its steps with it and returns them in the
reply's trailing metadata (STEPS_HEADER) when the host asked (TRACE_HEADER); the daemon times
its own steps with the same recorder (criserver.trace).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from types import TracebackType

# Request metadata: the host wants the agent's step timings of this call.
TRACE_HEADER = "x-criserver-trace"
# Trailing metadata of the reply: "name=ms,name=ms" (ms with two decimals).
STEPS_HEADER = "x-criserver-steps"
# What a reply's steps may hold: the guest is untrusted, its header is bounded when decoded.
_MAX_STEPS = 32
_MAX_NAME = 48

_current: ContextVar[Steps | None] = ContextVar("criserver_steps", default=None)
_OFF = contextlib.nullcontext()


class Steps:
    """Milliseconds per named step, in the order first seen; a step entered twice adds up.
    Tasks started inside a recorded call copy its context, recorder included: once the call
    ends (`recording` closes it) they record nothing more, and see no recorder."""

    __slots__ = ("ms", "open")

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.open = True

    def add(self, name: str, ms: float) -> None:
        if self.open:
            self.ms[name] = self.ms.get(name, 0.0) + ms

    def encode(self) -> str:
        return ",".join(f"{name}={ms:.2f}" for name, ms in self.ms.items())

    @staticmethod
    def decode(text: str) -> dict[str, float]:
        """The steps of an encoded header; malformed entries are skipped, not fatal."""
        out: dict[str, float] = {}
        for item in text.split(",")[:_MAX_STEPS]:
            name, _, value = item.partition("=")
            try:
                ms = float(value)
            except ValueError:
                continue
            if name and len(name) <= _MAX_NAME and name.replace("_", "").isalnum() \
                    and 0 <= ms < 1e9:
                out[name] = ms
        return out


class _Span:
    __slots__ = ("_name", "_start", "_steps")

    def __init__(self, steps: Steps, name: str) -> None:
        self._steps = steps
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._steps.add(self._name, (time.perf_counter() - self._start) * 1000)


def span(name: str) -> contextlib.AbstractContextManager[None]:
    """`with span("runc_create"): ...` adds the block's wall time to the current recorder, if
    any (an exception still counts the time)."""
    steps = _current.get()
    return _OFF if steps is None or not steps.open else _Span(steps, name)


def current() -> Steps | None:
    """The recorder of the call this code runs for, if it is being recorded."""
    steps = _current.get()
    return steps if steps is not None and steps.open else None


@contextlib.contextmanager
def recording(steps: Steps) -> Iterator[Steps]:
    """Install `steps` as the recorder of this context (and tasks started from it) until the
    block ends; then it is closed."""
    token = _current.set(steps)
    try:
        yield steps
    finally:
        steps.open = False
        _current.reset(token)
