"""Per-pod calls of a list RPC that overran their time. A pod whose call overran is "slow":
later lists leave it out at once and ask it again only in the background, and it is in the
lists again as soon as one of those calls answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from criserver.errors import CriError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A slow pod is waited for again after this long (its entry may be of a pod long removed).
FORGET_AFTER = 300.0


class Stragglers:
    """A wedged guest costs the lists one wait (`timeout`), not one per list: kubelet lists
    stats every few seconds, and each list would otherwise wait out the same silent pod."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._slow: dict[str, float] = {}  # pod id -> when its call overran
        self._running: dict[str, asyncio.Task[Any]] = {}  # one background call per slow pod

    async def each(self, calls: Mapping[str, Callable[[], Awaitable[T]]],
                   timeout: float) -> dict[str, T]:
        """Every pod's call at once; the answers given within `timeout`. Pods that are slow
        or whose call overran are left out, and so are those whose call failed with a CRI
        error (the pod stopped meanwhile, or its backend has no answer)."""
        now = time.monotonic()
        for pod_id, since in list(self._slow.items()):
            if now - since > FORGET_AFTER and pod_id not in self._running:
                del self._slow[pod_id]
        answers = await asyncio.gather(*(self._one(pod_id, call, timeout)
                                         for pod_id, call in calls.items()))
        return dict(answer for answer in answers if answer is not None)

    async def _one(self, pod_id: str, call: Callable[[], Awaitable[T]],
                   timeout: float) -> tuple[str, T] | None:
        if pod_id in self._slow:
            if pod_id not in self._running:
                self._in_background(pod_id, asyncio.ensure_future(call()))
            return None
        task = asyncio.ensure_future(call())
        try:
            return pod_id, await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            log.warning("pod left out of %s lists until it answers: none in %.0fs pod=%s",
                        self._what, timeout, pod_id)
            self._slow[pod_id] = time.monotonic()
            self._in_background(pod_id, task)
        except CriError as exc:
            log.debug("pod left out of a %s list pod=%s error=%s", self._what, pod_id, exc)
        except asyncio.CancelledError:  # the list's caller went away: the call ends unheard
            task.add_done_callback(_consume)
            raise
        return None

    def _in_background(self, pod_id: str, task: asyncio.Task[Any]) -> None:
        self._running[pod_id] = task
        task.add_done_callback(lambda done: self._ended(pod_id, done))

    def _ended(self, pod_id: str, task: asyncio.Task[Any]) -> None:
        self._running.pop(pod_id, None)
        if task.cancelled() or task.exception() is not None:
            return  # still slow: the next list asks it again, in the background
        if self._slow.pop(pod_id, None) is not None:
            log.info("pod answers %s lists again pod=%s", self._what, pod_id)


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit
