"""One VM's QEMU process: start or adopt it, control it over QMP (run state, saved state,
hot-added disks and NICs), and report its events.

QEMU daemonizes (it is not the daemon's child and outlives a daemon restart); its exit is seen
through a pidfd, its state changes through one QMP session per VM with one event reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shlex
import signal
import socket
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import (
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
    Runstate,
)
from qemu.qmp.events import EventListener

from criserver.errors import (
    CriError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from criserver.failpoints import crash_point
from criserver.vm import process
from criserver.vm.qemu import (
    HOTPLUG_PORT,
    Disk,
    TapNic,
    VMLocation,
    VMSpec,
    build_command,
    check_nic,
    disk_device,
    disk_node,
    netdev_options,
    nic_device,
)

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0  # QEMU daemonizes in ~0.2-0.4 s; a loaded 2-core host can be far slower
QMP_TIMEOUT = 5.0
EXIT_TIMEOUT = 5.0  # SIGKILL to process gone
MIGRATION_TIMEOUT = 30.0  # device state only: ~0.06 s here
UNPLUG_TIMEOUT = 30.0  # the guest acknowledges a removal (ACPI or PCIe hotplug): ~0.1-6 s
EVENT_NAMES = ("SHUTDOWN", "GUEST_PANICKED", "STOP", "RESUME", "RESET", "POWERDOWN",
               "DEVICE_DELETED")


class _QMPClient(QMPClient):
    """qemu.qmp's client, able to pass fds on any event loop: its own send_fd_scm reaches for
    asyncio's private socket object, which uvloop's transports (the daemon's) do not have."""

    def send_fd_scm(self, fd: int) -> None:
        assert self._writer is not None
        transport_socket = self._writer.transport.get_extra_info("socket")
        # A dup of the connection's socket: closing it leaves the transport's own fd alone.
        with socket.socket(fileno=os.dup(transport_socket.fileno())) as sock:
            if sock.family != socket.AF_UNIX:
                raise QMPError("passing file descriptors needs a Unix socket")
            sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   struct.pack("@i", fd))])

class EventKind(enum.StrEnum):
    SHUTDOWN = "SHUTDOWN"  # data["reason"]: guest-shutdown, guest-reset, guest-panic, host-...
    GUEST_PANICKED = "GUEST_PANICKED"
    STOP = "STOP"
    RESUME = "RESUME"
    RESET = "RESET"
    POWERDOWN = "POWERDOWN"
    DEVICE_DELETED = "DEVICE_DELETED"  # data["device"]: the id of an unplugged device
    EXITED = "EXITED"  # synthetic: the QEMU process is gone (always the last event)


@dataclass(frozen=True)
class VMEvent:
    kind: EventKind
    vm_id: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)


class VM:
    """A QEMU VM. Create with `VM(spec)` then `await start()`, or `await VM.adopt(location)`.

    `detach()` drops the host-side session and leaves QEMU running (daemon shutdown);
    `shutdown()`/`kill()` end QEMU.
    """

    def __init__(self, spec: VMSpec | VMLocation) -> None:
        self.spec = spec if isinstance(spec, VMSpec) else None  # None: adopted by location
        self.location = spec.location if isinstance(spec, VMSpec) else spec
        self.vm_id = spec.vm_id
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._qmp: QMPClient | None = None
        self._listener: EventListener | None = None
        self._pump: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._subscribers: list[asyncio.Queue[VMEvent | None]] = []  # None: detached
        self._history: list[VMEvent] = []  # lets late subscribers see EXITED
        self._exit_task: asyncio.Task[None] | None = None
        self._launcher: asyncio.subprocess.Process | None = None

    # --- properties ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    @property
    def recent_events(self) -> tuple[VMEvent, ...]:
        """The last events seen (up to 32), oldest first."""
        return tuple(self._history)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, max_wait: float = START_TIMEOUT) -> None:
        """Spawn QEMU, wait for it to daemonize, then connect QMP.

        :raises DeadlineExceeded: QEMU did not come up within `max_wait` seconds.
        :raises Internal: QEMU refused to start (the message carries its stderr).
        """
        if self._pid is not None:
            raise FailedPrecondition(f"vm {self.vm_id}: start: already started (pid {self._pid})")
        spec = self.spec
        if spec is None:
            raise FailedPrecondition(f"vm {self.vm_id}: start: adopted VMs cannot be started")
        argv = build_command(spec)
        await asyncio.to_thread(self._prepare_state_dir)
        log.info("vm starting vm=%s machine=%s accel=%s", self.vm_id, spec.machine, spec.accel)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(max_wait):
                await self._spawn(argv)
                await self._attach("start")
        except TimeoutError:
            await self._cleanup_failed_start()
            raise DeadlineExceeded(
                f"vm {self.vm_id}: start: QEMU not up within {max_wait:.0f}s"
            ) from None
        except BaseException:
            # Includes cancellation: never leave a QEMU behind that nobody tracks.
            await self._cleanup_failed_start()
            raise
        log.info(
            "vm started vm=%s pid=%s seconds=%.2f", self.vm_id, self._pid, time.monotonic() - t0
        )

    @classmethod
    async def adopt(cls, where: VMSpec | VMLocation, max_wait: float = QMP_TIMEOUT) -> VM:
        """Take over a VM left running by an earlier daemon (found by its pidfile + QMP socket).

        :raises NotFound: no live QEMU there.
        :raises Unavailable: QEMU lives but its QMP socket does not answer.
        """
        vm = cls(where)
        try:
            async with asyncio.timeout(max_wait):
                await vm._attach("adopt")
        except TimeoutError:
            await vm.detach()
            raise Unavailable(
                f"vm {where.vm_id}: adopt: QMP did not answer within {max_wait}s"
            ) from None
        except BaseException:
            await vm.detach()
            raise
        log.info("vm adopted vm=%s pid=%s", where.vm_id, vm._pid)
        return vm

    @staticmethod
    async def kill_leftover(location: VMLocation) -> bool:
        """SIGKILL whatever QEMU runs for `location` (a VM nobody holds: a crash's leftover).
        Returns whether one was running.

        :raises DeadlineExceeded: a QEMU survived SIGKILL (its state dir must then be kept).
        """
        pids = await asyncio.to_thread(process.qemu_pids, location.pidfile)
        if not pids:
            return False
        log.warning("killing leftover qemu vm=%s pids=%s", location.vm_id, pids)
        survivors = await asyncio.to_thread(process.kill_all, location.pidfile)
        if survivors:
            raise DeadlineExceeded(f"vm {location.vm_id}: qemu pids {survivors} survived SIGKILL")
        return True

    async def detach(self) -> None:
        """Stop watching the VM without touching it (QEMU keeps running); ends `events()`."""
        for q in self._subscribers:
            q.put_nowait(None)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        await self._close_qmp()
        self._close_pidfd()

    async def status(self) -> str:
        """QEMU's run state: running, paused, shutdown, guest-panicked, ... or "exited"."""
        if self.exited:
            return "exited"
        reply = await self._execute("status", "query-status")
        return str(reply["status"])

    async def pause(self) -> None:
        await self._execute("pause", "stop")

    async def resume(self) -> None:
        await self._execute("resume", "cont")

    async def save_state(self, path: Path, max_wait: float = MIGRATION_TIMEOUT) -> None:
        """Pause the guest and write its device state to `path`, leaving it paused.

        The guest's RAM is not written: it lives in the spec's shared memory file, which
        x-ignore-shared leaves out of the stream (the state of a micro-VM is ~70 KB).
        """
        await self.pause()
        await self._ignore_shared_memory("save state")
        uri = f"exec:cat > {shlex.quote(str(path))}"
        await self._execute("save state", "migrate", {"uri": uri})
        await self._wait_migration("save state", max_wait)

    async def restore_state(self, path: Path, max_wait: float = MIGRATION_TIMEOUT) -> None:
        """Load a device state saved by `save_state` into this VM (started with
        `spec.incoming`) and run it."""
        await self._ignore_shared_memory("restore state")
        await self._execute("restore state", "migrate-incoming",
                            {"uri": f"exec:cat {shlex.quote(str(path))}"})
        await self._wait_migration("restore state", max_wait)
        await self.resume()

    async def _ignore_shared_memory(self, step: str) -> None:
        await self._execute(step, "migrate-set-capabilities", {
            "capabilities": [{"capability": "x-ignore-shared", "state": True}]})

    async def _wait_migration(self, step: str, max_wait: float) -> None:
        deadline = time.monotonic() + max_wait
        while True:
            reply = await self._execute(step, "query-migrate")
            status = reply.get("status", "none")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise Internal(f"vm {self.vm_id}: {step}: migration {status}: "
                               f"{reply.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"vm {self.vm_id}: {step}: migration still {status} "
                                       f"after {max_wait:.0f}s")
            await asyncio.sleep(0.01)

    # --- hotplug (q35 with VMSpec.hotplug_slots) -------------------------------------------

    async def add_disk(self, disk: Disk) -> None:
        """Hot-add a virtio-blk disk into a free hotplug port.

        :raises ResourceExhausted: no free hotplug port.
        """
        port = await self._free_hotplug_port("add disk")
        await self._execute("add disk", "blockdev-add", disk_node(disk))
        try:
            await self._execute("add disk", "device_add",
                                {**disk_device(self.location.machine, disk), "bus": port})
        except BaseException:
            with contextlib.suppress(CriError):
                await self._execute("add disk: undo", "blockdev-del",
                                    {"node-name": disk_node(disk)["node-name"]})
            raise
        log.info("vm disk added vm=%s disk=%s port=%s", self.vm_id, disk.id, port)

    async def remove_disk(self, disk: Disk, max_wait: float = UNPLUG_TIMEOUT) -> None:
        """Unplug a hot-added disk (the guest acknowledges) and release its block node."""
        await self._unplug(disk.id, max_wait)
        await self._execute("remove disk", "blockdev-del",
                            {"node-name": disk_node(disk)["node-name"]})
        log.info("vm disk removed vm=%s disk=%s", self.vm_id, disk.id)

    async def resize_disk(self, disk: Disk, size_bytes: int) -> None:
        """Grow a disk live: its image file and the capacity the guest sees."""
        await self._execute("resize disk", "block_resize",
                            {"node-name": disk_node(disk)["node-name"], "size": size_bytes})
        log.info("vm disk resized vm=%s disk=%s bytes=%d", self.vm_id, disk.id, size_bytes)

    async def add_nic(self, nic: TapNic) -> None:
        """Hot-add a virtio-net NIC on the tap `nic.fd` (passed to QEMU over the QMP socket;
        the caller keeps and closes its own fd)."""
        if not nic.id:
            raise InvalidArgument(f"vm {self.vm_id}: add nic: a hot-added NIC needs an id")
        check_nic(self.vm_id, nic)
        port = await self._free_hotplug_port("add nic")
        qmp = self._connected("add nic")
        fd_name, netdev = f"{nic.id}-fd", f"{nic.id}-netdev"
        try:
            qmp.send_fd_scm(nic.fd)
        except (QMPError, OSError) as e:
            raise Unavailable(f"vm {self.vm_id}: add nic: passing the tap fd failed: {e}") from e
        await self._execute("add nic", "getfd", {"fdname": fd_name})
        try:
            await self._execute("add nic", "netdev_add", netdev_options(nic, netdev, fd_name))
        except BaseException:
            with contextlib.suppress(CriError):
                await self._execute("add nic: undo", "closefd", {"fdname": fd_name})
            raise
        try:
            await self._execute("add nic", "device_add", {
                **nic_device(self.location.machine, nic, nic.id, netdev), "bus": port})
        except BaseException:
            with contextlib.suppress(CriError):
                await self._execute("add nic: undo", "netdev_del", {"id": netdev})
            raise
        log.info("vm nic added vm=%s nic=%s port=%s", self.vm_id, nic.id, port)

    async def remove_nic(self, nic_id: str, max_wait: float = UNPLUG_TIMEOUT) -> None:
        """Unplug a hot-added NIC (the guest acknowledges) and close its tap."""
        await self._unplug(nic_id, max_wait)
        await self._execute("remove nic", "netdev_del", {"id": f"{nic_id}-netdev"})
        log.info("vm nic removed vm=%s nic=%s", self.vm_id, nic_id)

    async def devices(self) -> dict[str, str]:
        """The devices in hotplug ports: id -> port."""
        return {device: port for port, devices in (await self._ports("list devices")).items()
                for device in devices}

    async def _ports(self, step: str) -> dict[str, list[str]]:
        """Each hotplug port and the ids of the devices on it, from QEMU's object tree.
        (query-pci cannot tell: it only sees behind a port once the guest's firmware has
        numbered the port's bus, which cold-plugged devices at boot have not had yet.)"""
        peripheral = "/machine/peripheral"
        entries = await self._execute(step, "qom-list", {"path": peripheral})
        ports: dict[str, list[str]] = {}
        for entry in entries:
            name = str(entry.get("name", ""))
            if entry.get("type") != "child<pcie-root-port>" or not name.startswith(HOTPLUG_PORT):
                continue
            bus = f"{peripheral}/{name}/{name}"  # a root port's bus is named after it
            links = await self._execute(step, "qom-list", {"path": bus})
            ports[name] = []
            for link in links:
                if str(link.get("name", "")).startswith("child["):
                    path = await self._execute(step, "qom-get",
                                               {"path": bus, "property": link["name"]})
                    ports[name].append(str(path).rsplit("/", 1)[-1])
        return ports

    async def _free_hotplug_port(self, step: str) -> str:
        ports = await self._ports(step)
        for port in sorted(ports, key=lambda p: int(p.removeprefix(HOTPLUG_PORT) or 0)):
            if not ports[port]:
                return port
        raise ResourceExhausted(f"vm {self.vm_id}: {step}: no free hotplug port")

    async def _unplug(self, device_id: str, max_wait: float) -> None:
        """device_del, then wait for QEMU's DEVICE_DELETED: the guest let go of the device."""
        events = self.events()
        waiter = asyncio.ensure_future(self._device_deleted(events, device_id))
        await asyncio.sleep(0)  # subscribed before the request goes out
        try:
            await self._execute("remove device", "device_del", {"id": device_id})
            async with asyncio.timeout(max_wait):
                await waiter
        except TimeoutError:
            raise DeadlineExceeded(f"vm {self.vm_id}: remove device {device_id}: the guest did "
                                   f"not release it within {max_wait:.0f}s") from None
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            await events.aclose()

    async def _device_deleted(self, events: AsyncIterator[VMEvent], device_id: str) -> None:
        async for event in events:
            if event.kind is EventKind.DEVICE_DELETED and event.data.get("device") == device_id:
                return
            if event.kind is EventKind.EXITED:
                raise FailedPrecondition(f"vm {self.vm_id}: QEMU exited during an unplug")

    async def press_power_button(self) -> None:
        """One ACPI power button press: the guest decides whether and when to power off."""
        await self._execute("power button", "system_powerdown")

    async def shutdown(self, grace: float) -> None:
        """Ask the guest to power off; after `grace` seconds quit QEMU; SIGKILL as last resort.

        The ACPI power button only helps if the guest acts on it (the agent's job); QMP `quit`
        still ends QEMU cleanly (it flushes and removes its pidfile).
        """
        if self.exited:
            return
        log.info("vm shutdown vm=%s grace=%.1f", self.vm_id, grace)
        with contextlib.suppress(Unavailable, Internal, DeadlineExceeded, FailedPrecondition):
            await self._execute("shutdown: system_powerdown", "system_powerdown")
            if await self.wait_exited(grace):
                return
        await self.quit()

    async def quit(self) -> None:
        """End QEMU now, whatever the guest is doing (QMP `quit`: QEMU still flushes its disks
        and removes its pidfile); SIGKILL if it does not go."""
        if self.exited:
            return
        with contextlib.suppress(Unavailable, Internal, DeadlineExceeded, FailedPrecondition):
            await self._execute("quit", "quit")
        if await self.wait_exited(EXIT_TIMEOUT):
            return
        log.warning("vm did not quit, killing vm=%s pid=%s", self.vm_id, self._pid)
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL QEMU and wait until it is gone.

        :raises DeadlineExceeded: the process is still there after EXIT_TIMEOUT.
        """
        if self.exited:
            return
        if self._pidfd is None:
            # Detached (or never attached): nothing would notice the exit.
            raise FailedPrecondition(f"vm {self.vm_id}: kill: not attached to the VM")
        # Through the pidfd: cannot hit a recycled pid.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if not await self.wait_exited(EXIT_TIMEOUT):
            raise DeadlineExceeded(f"vm {self.vm_id}: kill: pid {self._pid} survived SIGKILL")

    async def wait_exited(self, max_wait: float | None = None) -> bool:
        """True once QEMU is gone; False if it still runs after `max_wait` seconds."""
        try:
            async with asyncio.timeout(max_wait):
                await self._exited.wait()
        except TimeoutError:
            return False
        if self._exit_task is not None:
            # Bounded (about 1.5 s at most): lets callers see the session fully closed.
            await asyncio.shield(self._exit_task)
        return True

    async def events(self) -> AsyncGenerator[VMEvent, None]:
        """Yield the VM's events from now on; ends after EXITED (yielded at once if gone) or on
        `detach()`."""
        queue: asyncio.Queue[VMEvent | None] = asyncio.Queue()
        if self.exited:
            if self._exit_task is not None:
                await asyncio.shield(self._exit_task)  # EXITED is published by this task
            for ev in self._history:
                if ev.kind is EventKind.EXITED:
                    yield ev
            return
        self._subscribers.append(queue)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
                if item.kind is EventKind.EXITED:
                    return
        finally:
            self._subscribers.remove(queue)

    # --- internals ------------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        where = self.location
        if process.qemu_pids(where.pidfile):
            # Never take the pidfile from under a live QEMU: it could not be found again.
            raise FailedPrecondition(f"vm {self.vm_id}: start: a QEMU already runs in "
                                     f"{where.state_dir}")
        where.state_dir.mkdir(parents=True, exist_ok=True)
        # A stale pidfile would make us watch a dead or recycled pid.
        where.pidfile.unlink(missing_ok=True)
        where.qmp_socket.unlink(missing_ok=True)

    async def _spawn(self, argv: list[str]) -> None:
        assert self.spec is not None
        log_fd = await asyncio.to_thread(
            os.open, self.location.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640
        )
        # The log outlives a start (a machine's console log): a failure quotes this one only.
        started_at = os.fstat(log_fd).st_size
        try:
            # The process we spawn is QEMU's launcher: it exits 0 once the daemonized QEMU is
            # initialised (pidfile written, sockets listening), or non-zero with the reason.
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
                # Tap fds opened in the pod's netns: QEMU inherits them under the same numbers.
                pass_fds=tuple(nic.fd for nic in self.spec.nics),
            )
        finally:
            os.close(log_fd)
        self._launcher = proc
        rc = await proc.wait()  # on cancellation, _cleanup_failed_start deals with it
        if rc != 0:
            tail = await asyncio.to_thread(self.log_tail, started_at)
            raise Internal(f"vm {self.vm_id}: start: qemu exited with {rc}: {tail}")
        crash_point("vm.spawned")  # QEMU runs; nothing of ours knows its pid yet

    def log_tail(self, since: int = 0, limit: int = 800) -> str:
        """The end of the VM's log (QEMU's stderr and the guest console) from offset `since`,
        at most `limit` bytes: what an error quotes. Blocking: call from a thread."""
        try:
            with self.location.log_file.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(since, f.tell() - limit))
                return f.read().decode(errors="replace").strip()
        except OSError as e:
            return f"(no log: {e})"

    async def _attach(self, step: str) -> None:
        """Find the pid, watch it, connect QMP and start the event pump."""
        pidfile = self.location.pidfile
        pid = await asyncio.to_thread(process.read_pid, pidfile)
        if pid is None:
            raise NotFound(f"vm {self.vm_id}: {step}: no valid pidfile {pidfile}")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NotFound(f"vm {self.vm_id}: {step}: QEMU pid {pid} is not running") from None
        self._pid, self._pidfd = pid, pidfd
        # Check identity after opening the pidfd: the pid cannot be recycled under us now.
        if not await asyncio.to_thread(process.is_qemu_of, pid, pidfile):
            self._close_pidfd()
            raise NotFound(f"vm {self.vm_id}: {step}: pid {pid} is not this VM's QEMU")
        asyncio.get_running_loop().add_reader(pidfd, self._on_process_exit)

        qmp = _QMPClient(self.vm_id)
        # The client's built-in listener is the one event queue, drained by one task; it
        # keeps only the events we report so nothing else piles up in it.
        listener = qmp.events
        listener.names = set(EVENT_NAMES)
        try:
            await qmp.connect(str(self.location.qmp_socket))
        except QMPError as e:
            with contextlib.suppress(QMPError):
                await qmp.disconnect()
            raise Unavailable(f"vm {self.vm_id}: {step}: QMP connect failed: {e}") from e
        self._qmp, self._listener = qmp, listener
        self._pump = asyncio.create_task(self._pump_events(), name=f"vm-events-{self.vm_id}")

    async def _pump_events(self) -> None:
        """The one reader of this VM's QMP events: fans them out to subscribers."""
        assert self._listener is not None
        async for msg in self._listener:
            kind = EventKind(str(msg["event"]))
            raw = msg.get("data")
            data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
            log.info("vm event vm=%s event=%s data=%s", self.vm_id, kind, data)
            self._publish(VMEvent(kind, self.vm_id, data))

    def _publish(self, ev: VMEvent) -> None:
        self._history = [*self._history[-31:], ev]
        for q in self._subscribers:
            q.put_nowait(ev)

    def _on_process_exit(self) -> None:
        # The pidfd became readable: QEMU is gone (kill -9, crash, guest shutdown, quit).
        self._close_pidfd()
        if self._exited.is_set():
            return
        self._exited.set()
        log.info("vm exited vm=%s pid=%s", self.vm_id, self._pid)
        # EXITED must come after any event QMP still has buffered: publish it from a task
        # that first lets the pump drain and the QMP session close.
        self._exit_task = asyncio.get_running_loop().create_task(
            self._finish_exit(), name=f"vm-exit-{self.vm_id}"
        )

    async def _finish_exit(self) -> None:
        qmp = self._qmp
        if qmp is not None:
            # Wait (bounded) for the QMP reader to hit EOF: every event QEMU sent before dying
            # is then in our listener.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while qmp.runstate is Runstate.RUNNING:
                        await qmp.runstate_changed()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                # EventListener offers no "drained" notification: poll its queue briefly.
                while self._listener is not None and not self._listener.empty():  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        await self._close_qmp()
        self._publish(VMEvent(EventKind.EXITED, self.vm_id, {"pid": self._pid}))

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def _close_qmp(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            # disconnect() re-raises whatever broke the session (EOF when QEMU died): expected.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    def _connected(self, step: str) -> QMPClient:
        if self.exited:
            raise FailedPrecondition(f"vm {self.vm_id}: {step}: QEMU has exited")
        if self._qmp is None:
            raise FailedPrecondition(f"vm {self.vm_id}: {step}: not connected to QMP")
        return self._qmp

    async def _execute(self, step: str, cmd: str, args: dict[str, object] | None = None) -> Any:
        qmp = self._connected(step)
        try:
            async with asyncio.timeout(QMP_TIMEOUT):
                return await qmp.execute(cmd, args)
        except TimeoutError:
            raise DeadlineExceeded(f"vm {self.vm_id}: {step}: QMP {cmd} timed out") from None
        except ExecuteError as e:
            raise Internal(f"vm {self.vm_id}: {step}: QMP {cmd} failed: {e}") from e
        except (ExecInterruptedError, QMPError, OSError, EOFError) as e:
            raise Unavailable(f"vm {self.vm_id}: {step}: QMP {cmd}: connection lost: {e}") from e

    async def _cleanup_failed_start(self) -> None:
        launcher = self._launcher
        if launcher is not None and launcher.returncode is None:
            # The launcher exits once the daemonized QEMU is initialised; killing it earlier
            # could leave that QEMU running before it wrote its pidfile. Wait for it, bounded.
            try:
                async with asyncio.timeout(EXIT_TIMEOUT):
                    await launcher.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    launcher.kill()
                await launcher.wait()
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        # Also whatever QEMU names our pidfile on its command line, pidfile written or not; and
        # only once they are gone, so no caller sees an orphan.
        await asyncio.to_thread(process.kill_all, self.location.pidfile, EXIT_TIMEOUT)
        await self.detach()
        log.warning("vm start failed, cleaned up vm=%s pid=%s", self.vm_id, self._pid)
