"""RemoveContainer answers before the guest has deleted: the delete runs in the background,
survives the daemon through its marker, and is dropped with the pod's guest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend
from criserver.backends.microvm.guest_deletes import GuestDeletes
from criserver.errors import NotFound, Unavailable
from criserver.store.records import ContainerRecord
from tests.microvm.test_backend_stop import POD, Handle, _backend

CID = "ab" * 32


class GuestStub:
    """Stands in for the agent's DeleteContainer: each delete waits until released."""

    def __init__(self, error: Exception | None = None) -> None:
        self.release = asyncio.Event()
        self.started: list[tuple[str, str]] = []
        self.done: list[str] = []
        self.cancelled: list[str] = []
        self.error = error

    async def delete(self, pod_id: str, container_id: str) -> None:
        self.started.append((pod_id, container_id))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(container_id)
            raise
        if self.error is not None:
            raise self.error
        self.done.append(container_id)


def _deletes(tmp_path: Path, guest: GuestStub) -> GuestDeletes:
    return GuestDeletes(lambda pod_id: tmp_path / pod_id / "deleting", guest.delete, delay=0)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def test_schedule_returns_before_the_guest_deletes_and_the_marker_goes_after(
        tmp_path: Path) -> None:
    (tmp_path / "pod").mkdir()
    guest = GuestStub()
    deletes = _deletes(tmp_path, guest)
    await deletes.schedule("pod", CID)
    marker = tmp_path / "pod" / "deleting" / CID
    assert marker.exists()
    await _settle()
    assert guest.started == [("pod", CID)] and guest.done == []
    assert deletes.pending("pod") == [CID]
    guest.release.set()
    await _settle()
    assert guest.done == [CID]
    assert deletes.pending("pod") == []
    assert not marker.exists()


async def test_a_failed_delete_keeps_its_marker_and_the_next_daemon_repeats_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "pod").mkdir()
    failing = GuestStub(Unavailable("connection lost"))
    failing.release.set()
    await _deletes(tmp_path, failing).schedule("pod", CID)
    await _settle()
    assert "guest delete failed" in caplog.text and "connection lost" in caplog.text
    assert (tmp_path / "pod" / "deleting" / CID).exists()

    guest = GuestStub()  # the next daemon, adopting the pod
    guest.release.set()
    restarted = _deletes(tmp_path, guest)
    assert await restarted.resume("pod") == [CID]
    await _settle()
    assert guest.done == [CID]
    assert not (tmp_path / "pod" / "deleting" / CID).exists()
    assert await restarted.resume("other-pod") == []  # nothing recorded: nothing to do


async def test_a_pod_stopped_within_the_delay_never_asks_its_guest(tmp_path: Path) -> None:
    (tmp_path / "pod").mkdir()
    guest = GuestStub()
    deletes = GuestDeletes(lambda pod_id: tmp_path / pod_id / "deleting", guest.delete,
                           delay=60)
    await deletes.schedule("pod", CID)
    await _settle()
    assert deletes.pending("pod") == [CID]
    await deletes.drop("pod")
    assert guest.started == []
    assert (tmp_path / "pod" / "deleting" / CID).exists()  # goes with the pod's state


async def test_dropping_a_pod_cancels_its_deletes_only(tmp_path: Path) -> None:
    for pod in ("pod", "neighbour"):
        (tmp_path / pod).mkdir()
    guest = GuestStub()
    deletes = _deletes(tmp_path, guest)
    await deletes.schedule("pod", CID)
    await deletes.schedule("neighbour", "cd" * 32)
    await _settle()
    await deletes.drop("pod")
    assert guest.cancelled == [CID]
    assert deletes.pending("pod") == [] and deletes.pending("neighbour") == ["cd" * 32]
    guest.release.set()
    await _settle()
    assert guest.done == ["cd" * 32]
    await deletes.close()


class BlockingAgent:
    """A live pod's agent whose DeleteContainer answers only when told."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[str] = []
        self.cancelled = False
        self.violation = None

    async def call(self, method: str, request: object, timeout: float | None = None) -> object:
        self.calls.append(method)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise NotFound("already deleted")  # the guest's answer to a repeat: not an error

    async def shutdown(self) -> None:
        pass


class LiveHandle(Handle):
    def __init__(self) -> None:
        super().__init__(BlockingAgent())  # type: ignore[arg-type]


def _live_backend(tmp_path: Path) -> tuple[MicroVMBackend, LiveHandle]:
    backend, _ = _backend(tmp_path)
    backend._guest_deletes._delay = 0
    handle = LiveHandle()
    backend._pods[POD.id] = handle  # type: ignore[assignment]
    backend._pod_state_dir(POD.id).mkdir(parents=True)
    return backend, handle


def _container() -> ContainerRecord:
    return ContainerRecord(id=CID, pod_id=POD.id, config=cri.ContainerConfig(),
                           image_ref="busybox", created_at=1)


async def test_remove_container_answers_while_the_guest_deletes(tmp_path: Path) -> None:
    backend, handle = _live_backend(tmp_path)
    await asyncio.wait_for(backend.remove_container(POD, _container()), 1.0)
    await _settle()
    assert handle.agent.calls == ["DeleteContainer"]  # under way, not waited for
    assert backend._guest_deletes.pending(POD.id) == [CID]
    marker = backend._pod_state_dir(POD.id) / "deleting" / CID
    assert marker.exists()
    handle.agent.release.set()  # type: ignore[attr-defined]
    await _settle()
    assert backend._guest_deletes.pending(POD.id) == []
    assert not marker.exists()  # NotFound is a delete done (by an earlier try)


async def test_stopping_the_pod_drops_its_pending_deletes(tmp_path: Path) -> None:
    backend, handle = _live_backend(tmp_path)
    await backend.remove_container(POD, _container())
    await _settle()
    await asyncio.wait_for(backend.stop_sandbox(POD), 1.0)
    assert handle.agent.cancelled  # type: ignore[attr-defined]
    assert backend._guest_deletes.pending(POD.id) == []
    assert handle.vm.calls == ["quit"]
    await backend.remove_sandbox(POD)
    assert not backend._pod_state_dir(POD.id).exists()  # the marker went with the pod


async def test_a_removal_in_a_pod_without_a_vm_asks_no_guest(tmp_path: Path) -> None:
    backend, _ = _backend(tmp_path)
    await backend.remove_container(POD, _container())
    assert backend._guest_deletes.pending(POD.id) == []
    assert not (backend._pod_state_dir(POD.id) / "deleting").exists()
