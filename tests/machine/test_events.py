"""Machine events: bounded, expiring, filtered by exact labels and an inclusive window."""

from __future__ import annotations

import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.machine.events import NORMAL, WARNING, EventStore


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def machine(machine_id: str, **labels: str) -> iri.Machine:
    m = iri.Machine()
    m.metadata.id = machine_id
    m.metadata.labels.update(labels)
    return m


def reasons(events: EventStore, f: iri.EventFilter | None = None) -> list[str]:
    return [e.spec.reason for e in events.list(f)]


def test_an_event_carries_the_metadata_seconds_and_an_action() -> None:
    clock = Clock(1_700_000_000.7)
    events = EventStore(clock=clock)
    events.record(machine("m", app="web"), NORMAL, "PullingImage", "pulling x", "")
    (event,) = events.list()
    assert event.spec.involved_object_meta.id == "m"
    assert event.spec.involved_object_meta.labels == {"app": "web"}
    assert event.spec.event_time == 1_700_000_000  # seconds, not nanoseconds
    assert event.spec.type == "Normal"
    assert event.spec.message == "pulling x"
    assert event.spec.action == "PullingImage"  # never empty


def test_the_type_is_normal_or_warning() -> None:
    events = EventStore()
    events.record(machine("m"), WARNING, "Failed", "", "Start")
    events.record(machine("m").metadata, NORMAL, "ByMetadata", "", "Start")
    assert [e.spec.involved_object_meta.id for e in events.list()] == ["m", "m"]
    with pytest.raises(ValueError):
        events.record(machine("m"), "Error", "Failed", "", "Start")


def test_label_filters_are_exact_and_empty_matches_all() -> None:
    events = EventStore()
    events.record(machine("a", app="web", tier="front"), NORMAL, "A", "", "x")
    events.record(machine("b", app="web"), NORMAL, "B", "", "x")
    events.record(machine("c"), NORMAL, "C", "", "x")
    assert reasons(events) == ["A", "B", "C"]
    assert reasons(events, iri.EventFilter(label_selector={"app": "web"})) == ["A", "B"]
    assert reasons(events, iri.EventFilter(label_selector={"app": "web", "tier": "front"})) == [
        "A"]
    assert reasons(events, iri.EventFilter(label_selector={"app": "we"})) == []
    assert reasons(events, iri.EventFilter(id="b")) == ["B"]


def test_the_window_is_inclusive_and_applies_only_with_both_bounds() -> None:
    clock = Clock(100)
    events = EventStore(clock=clock)
    for t, reason in ((100, "A"), (110, "B"), (120, "C")):
        clock.now = t
        events.record(machine("m"), NORMAL, reason, "", "x")
    assert reasons(events, iri.EventFilter(events_from_time=110, events_to_time=120)) == ["B", "C"]
    assert reasons(events, iri.EventFilter(events_from_time=100, events_to_time=110)) == ["A", "B"]
    assert reasons(events, iri.EventFilter(events_from_time=111, events_to_time=119)) == []
    assert reasons(events, iri.EventFilter(events_from_time=115)) == ["A", "B", "C"]
    assert reasons(events, iri.EventFilter(events_to_time=105)) == ["A", "B", "C"]


def test_the_store_is_bounded_in_number_and_age() -> None:
    clock = Clock(0)
    events = EventStore(capacity=3, max_age=300, clock=clock)
    for i in range(5):
        events.record(machine("m"), NORMAL, f"R{i}", "", "x")
    assert reasons(events) == ["R2", "R3", "R4"]
    clock.now = 200
    events.record(machine("m"), NORMAL, "late", "", "x")
    clock.now = 301
    assert reasons(events) == ["late"]
    clock.now = 501
    assert reasons(events) == []
