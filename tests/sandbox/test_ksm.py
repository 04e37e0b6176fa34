"""KSM state and switch, on a stand-in for /sys/kernel/mm/ksm/run."""

from __future__ import annotations

from pathlib import Path

from criserver.sandbox import ksm


def test_state_and_enable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert ksm.state(run).startswith("unavailable")
    run.write_text("0\n")
    assert ksm.state(run) == "off"
    assert ksm.enable(run) == "off"
    assert run.read_text() == "1\n" and ksm.state(run) == "on"
    assert ksm.enable(run) == "on"
    run.write_text("2\n")
    assert ksm.state(run) == "off (unmerging)"

