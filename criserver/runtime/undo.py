"""Undo steps for multi-step operations: each step registers how to take itself back.

If a later step fails the undos run in reverse order; an undo that fails is logged and reported,
so the caller can keep the object in an UNKNOWN state instead of forgetting it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class UndoStack:
    def __init__(self, what: str) -> None:
        self._what = what
        self._steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, description: str, undo: Callable[[], Awaitable[object]]) -> None:
        self._steps.append((description, undo))

    async def rollback(self) -> list[str]:
        """Run every undo in reverse; return the descriptions of those that failed."""
        failed = []
        while self._steps:
            description, undo = self._steps.pop()
            try:
                await undo()
            except Exception:
                log.exception("undo failed: %s (%s)", description, self._what)
                failed.append(description)
        return failed

    def discard(self) -> None:
        """The operation succeeded: its resources now belong to the object."""
        self._steps.clear()
