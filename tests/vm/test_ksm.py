"""KSM state and switch, on a stand-in for /sys/kernel/mm/ksm/run."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.backends.microvm.backend import MicroVMBackend
from criserver.config import Config, DaemonConfig
from criserver.runtime.backend import BackendContext
from criserver.vm import ksm
from tests.daemon import unmount_under


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



@pytest.mark.parametrize("wanted", [True, False])
async def test_backend_turns_ksm_on_only_when_configured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wanted: bool) -> None:
    run = tmp_path / "run"
    run.write_text("0\n")
    monkeypatch.setattr(ksm, "KSM_RUN", run)
    config = Config(daemon=DaemonConfig(root=str(tmp_path / "root"),
                                        state=str(tmp_path / "state")))
    context = BackendContext(handler="microvm", root=tmp_path / "root",
                             state=tmp_path / "state", config=config,
                             events=None)  # type: ignore[arg-type]
    backend = MicroVMBackend({"ksm": wanted, "accelerator": "tcg", "network": False,
                              "assets_dir": str(tmp_path / "no-assets")}, context)
    await backend.start([], [])
    try:
        assert ksm.state() == ("on" if wanted else "off")
        assert (await backend.status()).info["ksm"] == ksm.state()
    finally:
        await backend.close()
        unmount_under(tmp_path)  # the backend's private bind mount of its volumes root
