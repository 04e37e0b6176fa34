"""Stopping and removing a pod in the micro-VM backend: each resource is released once."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend
from criserver.config import Config
from criserver.errors import CriError, DeadlineExceeded, FailedPrecondition, Unavailable
from criserver.runtime.backend import BackendContext
from criserver.store.records import PodRecord

POD = PodRecord(id="cd" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                created_at=1)


class CountingNetwork:
    """Stands in for PodNetwork: counts teardowns (a CNI DEL, then the netns removed)."""

    def __init__(self) -> None:
        self.teardowns = 0
        self.steps: list[str] = []

    async def delete(self, pod_id: str) -> bool:
        self.steps.append("delete")
        return not self.teardowns

    async def remove_netns(self, pod_id: str, deleted: bool = False) -> bool:
        self.steps.append("remove_netns")
        self.teardowns += 1
        return deleted


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


class StoppingVM:
    """Stands in for VM: records how the backend ends it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def quit(self) -> None:
        self.calls.append("quit")

    async def wait_exited(self, max_wait: float | None = None) -> bool:
        self.calls.append("wait_exited")
        return False

    async def shutdown(self, grace: float) -> None:
        self.calls.append("shutdown")


class RefusingAgent:
    def __init__(self, error: CriError | None, violation: str | None = None) -> None:
        self.error = error
        self.violation = violation

    async def shutdown(self) -> None:
        if self.error is not None:
            raise self.error


class Handle:
    def __init__(self, agent: RefusingAgent) -> None:
        self.agent = agent
        self.vm = StoppingVM()
        self.stopping = False

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("agent", "calls"), [
    (RefusingAgent(None), ["quit"]),  # synced and acknowledged
    # Hostile or wedged: no grace, the guest will not power off by itself.
    (RefusingAgent(FailedPrecondition("broke"), violation="garbage"), ["quit"]),
    (RefusingAgent(DeadlineExceeded("no answer within 10.0s")), ["quit"]),
    # The agent gone (its connection lost): the guest may be powering off already.
    (RefusingAgent(Unavailable("connection lost")), ["wait_exited", "shutdown"]),
])
async def test_a_pod_whose_guest_cannot_sync_is_ended_without_waiting_for_it(
        tmp_path: Path, agent: RefusingAgent, calls: list[str]) -> None:
    backend, _ = _backend(tmp_path)
    handle = Handle(agent)
    await backend._power_off(handle)  # type: ignore[arg-type]
    assert handle.vm.calls == calls
    assert handle.stopping


async def test_cni_del_runs_while_the_guest_syncs_and_the_netns_goes_after_qemu(
        tmp_path: Path) -> None:
    backend, network = _backend(tmp_path)
    order: list[str] = []

    class SyncingAgent(RefusingAgent):
        async def shutdown(self) -> None:
            await asyncio.sleep(0.05)  # the guest syncing
            order.append(f"shutdown answered after {network.steps}")

    handle = Handle(SyncingAgent(None))
    real_quit = handle.vm.quit

    async def quit_() -> None:
        await real_quit()
        order.append(f"qemu gone after {network.steps}")

    handle.vm.quit = quit_  # type: ignore[method-assign]
    backend._pods[POD.id] = handle  # type: ignore[assignment]
    await backend.stop_sandbox(POD)
    assert order == ["shutdown answered after ['delete']", "qemu gone after ['delete']"]
    assert network.steps == ["delete", "remove_netns"]
