"""The machine events ListEvents answers: a bounded, lossy side channel, never a source of truth.

Kept in memory like the reference providers' stores: the newest `capacity` events no older than
`max_age` seconds. Poollets poll every minute with a [last poll, now] window, so minutes are plenty;
a daemon restart loses them, as a reference provider's restart does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

from criserver.api.iri.event.v1alpha1 import api_pb2 as event_pb2
from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.api.iri.meta.v1alpha1 import api_pb2 as meta_pb2

NORMAL = "Normal"
WARNING = "Warning"

DEFAULT_CAPACITY = 100
DEFAULT_MAX_AGE = 300.0


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every pair of the selector is in the labels (an empty selector matches everything)."""
    return all(labels.get(key) == value for key, value in selector.items())


class EventStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_age: float = DEFAULT_MAX_AGE,
                 clock: Callable[[], float] = time.time) -> None:
        self._events: deque[event_pb2.Event] = deque(maxlen=capacity)
        self._max_age = max_age
        self._clock = clock

    def record(self, subject: iri.Machine | meta_pb2.ObjectMetadata, type: str, reason: str,
               message: str, action: str) -> None:
        """Record an event about a machine, given as itself or its metadata (copied as it is
        now, labels included). `type` is NORMAL or WARNING; an empty `action` becomes the
        reason (clients need one)."""
        if type not in (NORMAL, WARNING):
            raise ValueError(f"event type must be {NORMAL!r} or {WARNING!r}, not {type!r}")
        metadata = subject.metadata if isinstance(subject, iri.Machine) else subject
        event = event_pb2.Event()
        spec = event.spec
        spec.involved_object_meta.CopyFrom(metadata)
        spec.type = type
        spec.reason = reason
        spec.message = message
        spec.action = action or reason
        spec.event_time = int(self._clock())
        self._events.append(event)

    def list(self, event_filter: iri.EventFilter | None = None) -> list[event_pb2.Event]:
        """Events oldest first: of the filter's object id and labels, and within its inclusive
        [from, to] window (Unix seconds) only when both bounds are set."""
        self._expire()
        f = event_filter or iri.EventFilter()
        windowed = f.events_from_time != 0 and f.events_to_time != 0
        found = []
        for event in self._events:
            meta = event.spec.involved_object_meta
            if f.id and meta.id != f.id:
                continue
            if not labels_match(f.label_selector, meta.labels):
                continue
            if windowed and not f.events_from_time <= event.spec.event_time <= f.events_to_time:
                continue
            found.append(event)
        return found

    def __len__(self) -> int:
        self._expire()
        return len(self._events)

    def _expire(self) -> None:
        oldest = self._clock() - self._max_age
        while self._events and self._events[0].spec.event_time < oldest:
            self._events.popleft()
