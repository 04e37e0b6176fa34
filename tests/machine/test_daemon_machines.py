"""The real daemon serving the IRI MachineRuntime on its own socket, called with grpcio."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from criserver import __version__
from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from tests.daemon import INERT_CONFIG, Daemon
from tests.machine.client import MachineClient
from tests.vm.conftest import vm_dir  # noqa: F401 - a fixture: short path, no QEMU left


async def create(client: MachineClient, **labels: str) -> iri.Machine:
    """A machine that stays off: these tests boot no VM (tests/machine/test_machines_vm.py
    does)."""
    machine = iri.Machine()
    machine.metadata.labels.update(labels)
    setattr(machine.spec, "class", "x1")
    machine.spec.power = iri.POWER_OFF
    root = machine.spec.volumes.add(name="root", device="oda")
    root.local_disk.size_bytes = 1 << 30
    response = await client.call("CreateMachine", iri.CreateMachineRequest(machine=machine))
    return response.machine  # type: ignore[no-any-return]


def machine_daemon(workdir: Path, state: Path) -> Daemon:
    """`state`: a short directory (the VMs' sockets live below it)."""
    path = workdir / "iri-machine.sock"
    return Daemon(workdir, INERT_CONFIG + (
        f'[machine]\nenabled = true\nlisten = "unix://{path}"\nstate = "{state}"\n'
        'classes = [{name = "x1", cpu = 1, memory_bytes = 67108864}]\n'))


def wait_for(path: Path, daemon: Daemon, timeout: float = 10) -> None:
    """Until the daemon serves on `path` (a killed daemon's socket file stays behind)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing serves on {path}:\n{daemon.log()}")
        time.sleep(0.02)


@pytest.fixture
def daemon(tmp_path: Path, vm_dir: Path) -> Iterator[Daemon]:  # noqa: F811 - the fixture
    d = machine_daemon(tmp_path, vm_dir).start()
    wait_for(tmp_path / "iri-machine.sock", d)
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[MachineClient]:
    c = MachineClient(daemon.workdir / "iri-machine.sock")
    try:
        yield c
    finally:
        await c.close()


async def test_version_and_status(client: MachineClient) -> None:
    version = await client.call("Version", iri.VersionRequest(version="0.1.0"))
    assert (version.runtime_name, version.runtime_version) == ("criserver", __version__)
    status = await client.call("Status", iri.StatusRequest())
    (x1,) = status.machine_class_status
    assert x1.machine_class.name == "x1"
    assert dict(x1.machine_class.capabilities.resources) == {"cpu": 1, "memory": 64 << 20}
    assert x1.quantity >= 1


async def test_create_list_delete(client: MachineClient, daemon: Daemon) -> None:
    a = await create(client, uid="a", pool="p")
    b = await create(client, uid="b", pool="p")
    assert a.status.state == iri.MACHINE_PENDING
    assert await client.list_ids(pool="p") == [a.metadata.id, b.metadata.id]
    assert await client.list_ids(uid="b") == [b.metadata.id]
    assert await client.list_ids(uid="b", pool="q") == []
    assert await client.list_ids(a.metadata.id) == [a.metadata.id]
    assert await client.list_ids("unknown") == []

    await client.call("DeleteMachine", iri.DeleteMachineRequest(machine_id=a.metadata.id))
    # Asynchronous: the reconciler releases what the machine had, then it leaves the list
    # (an off machine has nothing to shut down, so that is quick).
    deadline = time.monotonic() + 10
    while await client.list_ids(a.metadata.id) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await client.list_ids(pool="p") == [b.metadata.id]
    events = await client.call("ListEvents", iri.ListEventsRequest(
        filter=iri.EventFilter(label_selector={"uid": "a"})))
    assert "MachineDeletionSucceeded" in [e.spec.reason for e in events.events]
    for gone in (a.metadata.id, "unknown"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.call("DeleteMachine", iri.DeleteMachineRequest(machine_id=gone))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "rpc=DeleteMachine machine=unknown code=NOT_FOUND" in daemon.log()


async def test_errors_carry_their_codes(client: MachineClient) -> None:
    machine = iri.Machine()
    setattr(machine.spec, "class", "huge")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("CreateMachine", iri.CreateMachineRequest(machine=machine))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "machine class 'huge' is not offered" in str(err.value.details())
    m = await create(client)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.call("Exec", iri.ExecRequest(machine_id=m.metadata.id))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "is not running: no console to open" in str(err.value.details())


async def test_machines_survive_sigkill_and_the_socket_is_private(
        client: MachineClient, daemon: Daemon) -> None:
    path = daemon.workdir / "iri-machine.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    m = await create(client, uid="kept")
    await client.close()
    daemon.stop(signal.SIGKILL)
    daemon.start()
    wait_for(path, daemon)
    again = MachineClient(path)
    try:
        assert await again.list_ids(uid="kept") == [m.metadata.id]
    finally:
        await again.close()
    assert daemon.stop(signal.SIGTERM) == 0


def test_a_machine_socket_in_use_stops_the_start(tmp_path: Path, daemon: Daemon,
                                                  vm_dir: Path) -> None:  # noqa: F811
    taken = daemon.workdir / "iri-machine.sock"
    (tmp_path / "second").mkdir()
    second = Daemon(tmp_path / "second", INERT_CONFIG + (
        f'[machine]\nenabled = true\nlisten = "unix://{taken}"\nstate = "{vm_dir}/2"\n'))
    assert not _starts(second)
    assert f"another process is already serving on {taken}" in second.log()


def test_a_state_directory_too_long_for_the_vms_sockets_stops_the_start(
        tmp_path: Path) -> None:
    state = tmp_path / ("x" * 80)
    daemon = Daemon(tmp_path, INERT_CONFIG + (
        f'[machine]\nenabled = true\nlisten = "unix://{tmp_path}/m.sock"\nstate = "{state}"\n'))
    assert not _starts(daemon)
    assert "is too long for the VMs' Unix sockets" in daemon.log()


def _starts(daemon: Daemon) -> bool:
    try:
        daemon.start()
    except RuntimeError:
        pass  # exited before its CRI socket was seen
    assert daemon.process is not None
    try:
        return daemon.process.wait(20) == 0
    finally:
        daemon.kill()
