"""Real micro-VMs under TCG: boot to the agent channel, QMP control, shutdown, kill -9
detection, adoption after the controlling process died, failures that leave nothing behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from criserver.errors import FailedPrecondition, Internal, NotFound
from criserver.vm.assets import GuestAssets
from criserver.vm.qemu import DirectKernel, Machine, SerialTransport, VMSpec
from criserver.vm.vm import VM, EventKind, VMEvent
from tests.vm.conftest import first_guest_bytes, qemu_processes_of

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


async def _collect(vm: VM, into: list[VMEvent]) -> None:
    async for ev in vm.events():
        into.append(ev)


async def test_boot_pause_resume_shutdown(
    make_spec: Callable[..., VMSpec], guest_assets: GuestAssets
) -> None:
    # Every optional module group the kernel flavour has, to prove they all load.
    extra = sorted(guest_assets.module_groups - {"core", "mmio", "pci", "serial", "vsock"})
    spec = make_spec(module_groups=tuple(extra))
    vm = VM(spec)
    await vm.start()
    events: list[VMEvent] = []
    collector = asyncio.create_task(_collect(vm, events))
    try:
        assert isinstance(vm.pid, int)
        assert spec.pidfile.read_text().strip() == str(vm.pid)
        # QEMU daemonized: it is not our child.
        assert _ppid(vm.pid) != os.getpid()

        assert isinstance(spec.transport, SerialTransport)
        data = await first_guest_bytes(spec.transport.socket_path)
        assert data, "the guest closed the agent channel without a byte"
        console = spec.log_file.read_text(errors="replace")
        assert "criserver-init: starting agent" in console
        assert "insmod" not in console, "a module failed to load"

        assert await vm.status() == "running"
        await vm.pause()
        assert await vm.status() == "paused"
        await vm.resume()
        assert await vm.status() == "running"

        await vm.shutdown(grace=1.0)
        assert vm.exited
        assert await vm.status() == "exited"
        await asyncio.wait_for(collector, 5)
    finally:
        await vm.kill()
        collector.cancel()
    kinds = [e.kind for e in events]
    assert kinds[:2] == [EventKind.STOP, EventKind.RESUME]
    assert EventKind.SHUTDOWN in kinds
    assert kinds[-1] is EventKind.EXITED
    assert not qemu_processes_of(spec.state_dir)
    with pytest.raises(FailedPrecondition):
        await vm.pause()


async def test_kill9_from_outside_is_seen(make_spec: Callable[..., VMSpec]) -> None:
    vm = VM(make_spec())
    await vm.start()
    events: list[VMEvent] = []
    collector = asyncio.create_task(_collect(vm, events))
    try:
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        assert await vm.wait_exited(2.0), "QEMU's death not noticed within 2 s"
        await asyncio.wait_for(collector, 5)
    finally:
        await vm.kill()
        collector.cancel()
    assert events[-1].kind is EventKind.EXITED
    assert await vm.status() == "exited"


async def test_adopt_after_controller_process_died(
    make_spec: Callable[..., VMSpec], vm_dir: Path
) -> None:
    spec = make_spec()
    # A separate Python process starts the VM and exits without cleaning up: a daemon crash.
    script = textwrap.dedent(
        f"""
        import asyncio, os, pickle
        from criserver.vm.vm import VM
        spec = pickle.loads(bytes.fromhex({pickle.dumps(spec).hex()!r}))
        async def main():
            vm = VM(spec)
            await vm.start()
            print(vm.pid, flush=True)
            os._exit(0)
        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    pid = int(out.decode().split()[0])

    # By its location alone: a restarted daemon needs no assets to find its VMs.
    vm = await VM.adopt(spec.location)
    try:
        assert vm.pid == pid
        assert await vm.status() in ("running", "paused")
        await vm.pause()
        assert await vm.status() == "paused"
        os.kill(pid, signal.SIGKILL)
        assert await vm.wait_exited(2.0)
    finally:
        await vm.kill()


async def test_adopt_without_vm_is_not_found(make_spec: Callable[..., VMSpec]) -> None:
    with pytest.raises(NotFound, match="pidfile"):
        await VM.adopt(make_spec())


async def test_start_failure_names_vm_and_cause(
    make_spec: Callable[..., VMSpec], vm_dir: Path
) -> None:
    spec = make_spec()
    assert isinstance(spec.boot, DirectKernel)
    spec = dataclasses.replace(
        spec, boot=dataclasses.replace(spec.boot, kernel=vm_dir / "no-such-kernel"))
    with pytest.raises(Internal) as info:
        await VM(spec).start()
    assert spec.vm_id in str(info.value) and "start" in str(info.value)
    assert "no-such-kernel" in str(info.value)
    assert not qemu_processes_of(vm_dir)


@pytest.mark.parametrize("when", ["at_once", "qemu_spawned"])
async def test_cancelled_start_leaves_no_qemu(
    make_spec: Callable[..., VMSpec], vm_dir: Path, when: str
) -> None:
    spec = make_spec()
    task = asyncio.create_task(VM(spec).start())
    if when == "qemu_spawned":
        # Cancel in the middle: QEMU exists (its pidfile is there) but start() is not done.
        async with asyncio.timeout(30):
            while not spec.pidfile.exists() and not task.done():
                await asyncio.sleep(0.001)
    else:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not qemu_processes_of(vm_dir)


@pytest.mark.parametrize("machine", [Machine.MICROVM, Machine.Q35])
async def test_guest_panic_is_reported(make_spec: Callable[..., VMSpec], machine: Machine) -> None:
    # /init finds no root disk with this serial and exits: PID 1 dying panics the guest.
    vm = VM(make_spec(root_serial="not-the-root", machine=machine))
    await vm.start()
    events: list[VMEvent] = []
    collector = asyncio.create_task(_collect(vm, events))
    try:
        assert await vm.wait_exited(90.0)
        await asyncio.wait_for(collector, 5)
    finally:
        await vm.kill()
        collector.cancel()
    kinds = [e.kind for e in events]
    assert EventKind.GUEST_PANICKED in kinds
    shutdown = [e for e in events if e.kind is EventKind.SHUTDOWN]
    assert shutdown and shutdown[0].data.get("reason") == "guest-panic"
    assert kinds[-1] is EventKind.EXITED
