"""Stopping and removing a pod in the micro-VM backend: each resource is released once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend
from criserver.config import Config
from criserver.runtime.backend import BackendContext
from criserver.store.records import PodRecord

POD = PodRecord(id="cd" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                created_at=1)


class CountingNetwork:
    """Stands in for PodNetwork: counts teardowns."""

    def __init__(self) -> None:
        self.teardowns = 0

    async def teardown(self, pod_id: str) -> bool:
        self.teardowns += 1
        return self.teardowns == 1


def _backend(tmp_path: Path) -> tuple[MicroVMBackend, CountingNetwork]:
    context = BackendContext(handler="microvm", root=tmp_path / "root",
                             state=tmp_path / "state", config=Config(),
                             events=None)  # type: ignore[arg-type]
    backend = MicroVMBackend({"assets_dir": str(tmp_path / "no-assets")}, context)
    network = CountingNetwork()
    backend.network = network  # type: ignore[assignment]
    return backend, network


async def test_stop_then_remove_tears_the_network_down_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend, network = _backend(tmp_path)
    caplog.set_level(logging.INFO, "criserver.backends.microvm.backend")
    # kubelet stops (often more than once); RemovePodSandbox stops again, then removes.
    await backend.stop_sandbox(POD)
    await backend.stop_sandbox(POD)
    await backend.stop_sandbox(POD)
    await backend.remove_sandbox(POD)
    assert network.teardowns == 1
    assert [r.message for r in caplog.records].count(f"pod vm stopped pod={POD.id}") == 1


async def test_remove_without_stop_tears_down(tmp_path: Path) -> None:
    """A pod whose stop never ran here (half-made at a crash, or stopped by an earlier
    daemon) is still torn down by its removal; stopping is idempotent across restarts."""
    backend, network = _backend(tmp_path)
    await backend.remove_sandbox(POD)
    assert network.teardowns == 1
    await backend.remove_sandbox(POD)  # removed already: repeated, harmless
    assert network.teardowns == 2
