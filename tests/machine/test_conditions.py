"""Status conditions: one per type, transition time moves with the status only."""

from __future__ import annotations

import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.machine.conditions import FALSE, TRUE, get_condition, set_condition


def test_a_condition_is_set_once_per_type_and_transitions_with_its_status() -> None:
    status = iri.MachineStatus()
    set_condition(status, "Ready", FALSE, "Booting", now_ns=1)
    set_condition(status, "Ready", FALSE, "StillBooting", "kernel up", now_ns=2)
    ready = get_condition(status, "Ready")
    assert ready is not None
    assert (ready.reason, ready.message, ready.last_transition_time) == (
        "StillBooting", "kernel up", 1)
    set_condition(status, "Ready", TRUE, "Running", now_ns=3)
    set_condition(status, "ImagePulled", TRUE, "Pulled", now_ns=4)
    assert [(c.type, c.status, c.last_transition_time) for c in status.machine_conditions] == [
        ("Ready", "True", 3), ("ImagePulled", "True", 4)]
    assert get_condition(status, "Other") is None
    with pytest.raises(ValueError):
        set_condition(status, "Ready", "yes", "Running")
