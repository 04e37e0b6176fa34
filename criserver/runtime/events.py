"""Container lifecycle events, fanned out to every GetContainerEvents subscriber.

Each subscriber has a bounded queue: a subscriber that stops reading is cut off with an error
(it can re-subscribe and re-list) rather than growing the daemon's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import ResourceExhausted

log = logging.getLogger(__name__)
QUEUE_LIMIT = 1024
_OVERFLOW = object()


class EventBroadcaster:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[object]] = set()

    def publish(self, event: cri.ContainerEventResponse) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() >= QUEUE_LIMIT - 1:
                self._subscribers.discard(queue)
                queue.put_nowait(_OVERFLOW)
                log.warning("event subscriber too slow: cut off")
                continue
            queue.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[cri.ContainerEventResponse]:
        queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_LIMIT)
        self._subscribers.add(queue)
        try:
            while True:
                item = await queue.get()
                if item is _OVERFLOW:
                    raise ResourceExhausted(
                        f"event stream fell {QUEUE_LIMIT} events behind: re-subscribe and re-list"
                    )
                assert isinstance(item, cri.ContainerEventResponse)
                yield item
        finally:
            self._subscribers.discard(queue)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
