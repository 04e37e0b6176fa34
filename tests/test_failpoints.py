"""The crash points in the code and the ones the crash tests (micro-VM and runc) kill the daemon
at are the same names: a point added without a case, or a case whose point was renamed away,
fails here (the e2e test would only see a daemon that never dies)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e import test_crash_recovery_import as import_crash
from tests.e2e import test_crash_recovery_runc as runc_crash
from tests.e2e import test_crash_recovery_vm as crash

REPO = Path(__file__).resolve().parent.parent


def _points_in_code() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "criserver").rglob("*.py"):
        names |= set(re.findall(r'crash_point\("([\w.]+)"\)', path.read_text()))
    return names


def test_every_crash_point_has_a_case_and_every_case_a_point() -> None:
    tested = {*crash.STEPS, *crash.CONTAINER_STEPS, *crash.POD_STEPS, *crash.PULL_STEPS,
              *crash.REMOVE_CONTAINER_STEPS,
              *crash.TEMPLATE_STEPS, *crash.POOL_STEPS,
              *runc_crash.STEPS, *import_crash.IMPORT_STEPS}
    assert _points_in_code() == tested


def test_points_are_named_call_dot_step() -> None:
    for name in _points_in_code():
        assert re.fullmatch(r"[a-z_]+\.[a-z_]+", name), name
