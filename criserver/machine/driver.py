"""One IRI machine as a QEMU VM: what the reconciler asks of the VM layer, and nothing more.

The driver knows a machine's shape (vCPUs, memory), how it boots, its disks and NICs as host
files and taps, its Ignition data and host name, and turns them into a q35 VM with an
interactive serial console and free PCIe root ports. It starts, adopts (after a daemon
restart), hot-plugs and stops those VMs, and tells the reconciler when one ends. Where disks
come from (images, sizes) and which taps exist is the reconciler's business.

Files: the VM's own directory (pidfile, QMP and console sockets, console log, Ignition file)
is `state_dir/<machine id's first 32 digits>`, found again by a restarted daemon from the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from criserver import files
from criserver.errors import CriError, InvalidArgument, NotFound, Unavailable
from criserver.machine import network
from criserver.vm.host import VMHost
from criserver.vm.qemu import (
    MAX_SOCKET_PATH,
    DirectKernel,
    Disk,
    Firmware,
    FwCfgFile,
    Machine,
    RebootPolicy,
    TapNic,
    VMLocation,
    VMSpec,
)
from criserver.vm.vm import VM, EventKind

log = logging.getLogger(__name__)

IGNITION_FW_CFG = "opt/com.coreos/config"  # where Ignition looks on QEMU (reference provider)
# QEMU wants opt/<reverse domain>/... names; Ignition reads the other one itself.
HOSTNAME_FW_CFG = "opt/dev.ironcore/hostname"


@dataclass(frozen=True)
class Shape:
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class KernelBoot:
    """Boot the OS image's kernel and initramfs directly (no firmware: seconds faster under
    emulation), with the image's command line."""

    kernel: Path
    initramfs: Path | None
    cmdline: str


@dataclass(frozen=True)
class DiskBoot:
    """Boot through firmware from the machine's first disk."""


Boot = KernelBoot | DiskBoot


@dataclass(frozen=True)
class MachineDisk:
    """A volume as a virtio disk; the guest finds it by its serial, the IRI device name."""

    device: str  # "oda"...: the serial, and the QEMU id's suffix
    path: Path
    format: str = "qcow2"
    read_only: bool = False

    def as_vm_disk(self) -> Disk:
        return Disk(id=device_id(self.device), path=self.path, serial=self.device,
                    read_only=self.read_only, format=self.format)


@dataclass(frozen=True)
class MachineNic:
    name: str
    tap: str  # the host tap (machine/network.py) QEMU gets an fd of
    mac: str


def device_id(device: str) -> str:
    return f"vol-{device}"


def nic_device_id(index_key: str) -> str:
    return f"nic-{index_key}"


# Machine ids are 63 random hex digits; 32 of them (128 bits) name the VM's directory, short
# enough that its sockets fit AF_UNIX's 108 bytes below an ordinary state directory.
VM_DIR_ID_CHARS = 32
LONGEST_SOCKET_NAME = "console.sock"


def vm_dir(state_dir: Path, machine_id: str) -> Path:
    return state_dir / machine_id[:VM_DIR_ID_CHARS]


def check_state_dir(state_dir: Path) -> None:
    """:raises InvalidArgument: the machines' sockets would not fit a Unix socket address."""
    longest = len(str(state_dir)) + 1 + VM_DIR_ID_CHARS + 1 + len(LONGEST_SOCKET_NAME)
    if longest > MAX_SOCKET_PATH:
        raise InvalidArgument(f"machine state directory {state_dir} is too long for the VMs' "
                              f"Unix sockets ({longest} > {MAX_SOCKET_PATH} bytes): pick a "
                              f"shorter [machine] state")


@dataclass(frozen=True)
class DriverSettings:
    state_dir: Path
    hotplug_slots: int = 30  # as the reference provider: room for volumes and NICs
    qemu_binary: str = "qemu-system-x86_64"


# (machine id, whether the guest powered itself off rather than QEMU dying under it)
ExitCallback = Callable[[str, bool], None]


class MachineDriver:
    def __init__(self, host: VMHost, settings: DriverSettings, on_exit: ExitCallback) -> None:
        self._host = host
        self._settings = settings
        self._on_exit = on_exit
        self._vms: dict[str, VM] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}

    # --- where things are ------------------------------------------------------------------

    def location(self, machine_id: str) -> VMLocation:
        return VMLocation(f"machine-{machine_id}", vm_dir(self._settings.state_dir, machine_id),
                          Machine.Q35)

    def console_socket(self, machine_id: str) -> Path:
        return self.location(machine_id).console_socket

    def console_log(self, machine_id: str) -> Path:
        return self.location(machine_id).log_file

    def running(self, machine_id: str) -> bool:
        vm = self._vms.get(machine_id)
        return vm is not None and not vm.exited

    def pid(self, machine_id: str) -> int | None:
        vm = self._vms.get(machine_id)
        return vm.pid if vm is not None and not vm.exited else None

    # --- lifecycle ---------------------------------------------------------------------------

    async def adopt(self, machine_id: str) -> bool:
        """Take over the machine's QEMU left by an earlier daemon. False: none runs."""
        location = self.location(machine_id)
        try:
            vm = await VM.adopt(location)
        except NotFound:
            return False
        except Unavailable as exc:
            log.warning("machine QEMU does not answer, killing it machine=%s: %s",
                        machine_id, exc.message)
            await VM.kill_leftover(location)
            return False
        self._watch(machine_id, vm)
        return True

    async def start(self, machine_id: str, shape: Shape, boot: Boot,
                    disks: list[MachineDisk], nics: list[MachineNic],
                    ignition: bytes, hostname: str) -> None:
        """Start the machine's VM with these devices (all unpluggable later).

        :raises CriError: QEMU refused (the message says why).
        """
        if self.running(machine_id):
            return
        location = self.location(machine_id)
        await asyncio.to_thread(location.state_dir.mkdir, parents=True, exist_ok=True)
        fw_cfg = []
        if ignition:
            fw_cfg.append(await self._fw_cfg_file(location, "ignition", IGNITION_FW_CFG,
                                                  ignition))
        if hostname:
            fw_cfg.append(await self._fw_cfg_file(location, "hostname", HOSTNAME_FW_CFG,
                                                  hostname.encode()))
        fds: list[int] = []
        try:
            for nic in nics:
                fds.append(await network.open_tap(nic.tap))
            accel = await self._host.accelerator()
            spec = VMSpec(
                vm_id=location.vm_id,
                state_dir=location.state_dir,
                boot=_boot_source(boot, hostname),
                machine=Machine.Q35,
                accel=accel.name,
                vcpus=shape.vcpus,
                memory_mib=shape.memory_mib,
                reboot=RebootPolicy.RESET,
                disks=tuple(d.as_vm_disk() for d in disks),
                nics=tuple(TapNic(fd, nic.mac, id=nic_device_id(nic.name))
                           for fd, nic in zip(fds, nics, strict=True)),
                hotplug_slots=self._settings.hotplug_slots,
                unpluggable_devices=True,
                interactive_console=True,
                fw_cfg=tuple(fw_cfg),
                qemu_binary=self._settings.qemu_binary,
            )
            vm = VM(spec)
            await vm.start()
        finally:
            for fd in fds:
                os.close(fd)  # QEMU has its own copies
        self._watch(machine_id, vm)

    async def press_power_button(self, machine_id: str) -> None:
        vm = self._vms.get(machine_id)
        if vm is not None and not vm.exited:
            with contextlib.suppress(CriError):
                await vm.press_power_button()

    async def kill(self, machine_id: str) -> None:
        vm = self._vms.get(machine_id)
        if vm is not None and not vm.exited:
            await vm.kill()
        elif vm is None:
            await VM.kill_leftover(self.location(machine_id))

    async def forget(self, machine_id: str) -> None:
        """After the VM is gone for good: drop it and its directory (console log included)."""
        task = self._watchers.pop(machine_id, None)
        if task is not None:
            task.cancel()
        self._vms.pop(machine_id, None)
        await asyncio.to_thread(shutil.rmtree, self.location(machine_id).state_dir, True)

    async def close(self) -> None:
        """Leave every VM running (a daemon restart re-adopts them)."""
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        for vm in self._vms.values():
            await vm.detach()
        self._vms.clear()

    # --- devices ------------------------------------------------------------------------------

    async def attached(self, machine_id: str) -> set[str]:
        """The QEMU ids of the devices the machine has now (disks: vol-*, NICs: nic-*)."""
        return set(await self._vm(machine_id).devices())

    async def add_disk(self, machine_id: str, disk: MachineDisk) -> None:
        await self._vm(machine_id).add_disk(disk.as_vm_disk())

    async def remove_disk(self, machine_id: str, disk: MachineDisk) -> None:
        await self._vm(machine_id).remove_disk(disk.as_vm_disk())

    async def resize_disk(self, machine_id: str, disk: MachineDisk, size_bytes: int) -> None:
        await self._vm(machine_id).resize_disk(disk.as_vm_disk(), size_bytes)

    async def add_nic(self, machine_id: str, nic: MachineNic) -> None:
        fd = await network.open_tap(nic.tap)
        try:
            await self._vm(machine_id).add_nic(TapNic(fd, nic.mac, id=nic_device_id(nic.name)))
        finally:
            os.close(fd)

    async def remove_nic(self, machine_id: str, nic_name: str) -> None:
        await self._vm(machine_id).remove_nic(nic_device_id(nic_name))

    # --- internals ------------------------------------------------------------------------------

    def _vm(self, machine_id: str) -> VM:
        vm = self._vms.get(machine_id)
        if vm is None or vm.exited:
            raise Unavailable(f"machine {machine_id} is not running")
        return vm

    @staticmethod
    async def _fw_cfg_file(location: VMLocation, name: str, key: str, data: bytes
                           ) -> FwCfgFile:
        path = location.state_dir / name
        await asyncio.to_thread(files.write_atomic, path, data, mode=0o600)
        return FwCfgFile(key, path)

    def _watch(self, machine_id: str, vm: VM) -> None:
        self._vms[machine_id] = vm
        old = self._watchers.pop(machine_id, None)
        if old is not None:
            old.cancel()
        self._watchers[machine_id] = asyncio.create_task(
            self._until_exit(machine_id, vm), name=f"machine-exit-{machine_id}")

    async def _until_exit(self, machine_id: str, vm: VM) -> None:
        powered_off = False
        async for event in vm.events():
            if event.kind is EventKind.SHUTDOWN:
                powered_off = event.data.get("reason") == "guest-shutdown"
            elif event.kind is EventKind.EXITED:
                log.info("machine vm exited machine=%s guest_powered_off=%s", machine_id,
                         powered_off)
                self._on_exit(machine_id, powered_off)
                return


def _boot_source(boot: Boot, hostname: str) -> DirectKernel | Firmware:
    if isinstance(boot, KernelBoot):
        cmdline = boot.cmdline
        if hostname:
            cmdline = f"{cmdline} hostname={hostname}".strip()
        return DirectKernel(boot.kernel, boot.initramfs, cmdline)
    return Firmware()
