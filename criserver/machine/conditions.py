"""Conditions in a machine's status, as Kubernetes keeps them: one per type, and the transition
time moves only when the condition's status does (a new reason or message alone is no
transition). Written by the reconciler inside `MachineStore.update_status`."""

from __future__ import annotations

import time

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def set_condition(status: iri.MachineStatus, type: str, value: str, reason: str,
                  message: str = "", now_ns: int | None = None) -> None:
    """Set condition `type` to `value` (TRUE, FALSE or UNKNOWN); last_transition_time is Unix
    nanoseconds, like the metadata's timestamps."""
    if value not in (TRUE, FALSE, UNKNOWN):
        raise ValueError(f"condition {type}: status must be True, False or Unknown, not {value!r}")
    for condition in status.machine_conditions:
        if condition.type == type:
            break
    else:
        condition = status.machine_conditions.add(type=type)
    if condition.status != value:
        condition.last_transition_time = time.time_ns() if now_ns is None else now_ns
    condition.status = value
    condition.reason = reason
    condition.message = message


def get_condition(status: iri.MachineStatus, type: str) -> iri.Conditions | None:
    return next((c for c in status.machine_conditions if c.type == type), None)
