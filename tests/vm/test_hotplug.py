"""The VM layer alone, without the pod guest or its agent: a plain q35 VM (the guest kernel with a
busybox initramfs of the test's own) gets a disk and a NIC hot-added and removed over QMP, and
its kernel sees each come and go."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from criserver.errors import ResourceExhausted
from criserver.network import netns
from criserver.vm import assets as assets_mod
from criserver.vm import tap
from criserver.vm.qemu import DirectKernel, Disk, Machine, RebootPolicy, TapNic, VMSpec
from criserver.vm.vm import VM
from guest.build import Cpio

pytestmark = pytest.mark.vm

# PID 1 of the plain guest: report the PCI devices the kernel sees, over and over.
INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
while true; do
  echo "pci-devices $(/bin/busybox ls /sys/bus/pci/devices | /bin/busybox wc -l)"
  /bin/busybox sleep 0.3
done
"""
_COUNT = re.compile(rb"pci-devices (\d+)")


def plain_initramfs(path: Path) -> None:
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    c.file("init", INIT, 0o755)
    path.write_bytes(c.finish())


def plain_spec(guest_assets: assets_mod.GuestAssets, vm_dir: Path) -> VMSpec:
    initramfs = vm_dir / "plain.cpio"
    plain_initramfs(initramfs)
    spec = VMSpec(
        vm_id="plain", state_dir=vm_dir,
        boot=DirectKernel(guest_assets.kernel, initramfs, "console=ttyS0 panic=-1"),
        machine=Machine.Q35, reboot=RebootPolicy.RESET, hotplug_slots=2, pvpanic=False)
    assert spec.transport is None
    return spec


@pytest.fixture
async def plain_vm(guest_assets: assets_mod.GuestAssets, vm_dir: Path) -> AsyncIterator[VM]:
    vm = VM(plain_spec(guest_assets, vm_dir))
    await vm.start()
    try:
        yield vm
    finally:
        await vm.kill()


async def pci_devices_seen(log: Path, after: int = 0, max_wait: float = 120.0) -> tuple[int, int]:
    """The guest's latest PCI device count printed after byte `after` of its console log, and
    where the log ends now."""
    deadline = asyncio.get_running_loop().time() + max_wait
    while True:
        data = await asyncio.to_thread(log.read_bytes)
        counts = _COUNT.findall(data[after:])
        if counts:
            return int(counts[-1]), len(data)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the guest printed no device count: {data[-500:]!r}")
        await asyncio.sleep(0.3)


async def count_becomes(log: Path, want: int, max_wait: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + max_wait
    offset = (await asyncio.to_thread(log.stat)).st_size
    while True:
        seen, _ = await pci_devices_seen(log, offset, max_wait)
        if seen == want:
            return
        assert asyncio.get_running_loop().time() < deadline, f"guest sees {seen}, not {want}"
        await asyncio.sleep(0.3)


async def test_hot_add_and_remove_a_disk_and_a_nic(plain_vm: VM, vm_dir: Path) -> None:
    log = plain_vm.location.log_file
    booted, _ = await pci_devices_seen(log)  # the guest is up and counting
    assert await plain_vm.devices() == {}

    data = vm_dir / "data.img"
    data.write_bytes(b"\0" * (1 << 20))
    disk = Disk("data", data, serial="data1", read_only=False)
    await plain_vm.add_disk(disk)
    assert await plain_vm.devices() == {"data": "hotplug0"}
    await count_becomes(log, booted + 1)

    async with hot_added_nic(plain_vm, vm_dir, "02:00:00:00:00:42"):
        assert await plain_vm.devices() == {"data": "hotplug0", "nic1": "hotplug1"}
        await count_becomes(log, booted + 2)
        # Two ports, both taken.
        with pytest.raises(ResourceExhausted):
            await plain_vm.add_disk(Disk("more", data, read_only=True))

        await plain_vm.remove_disk(disk)
        await plain_vm.remove_nic("nic1")
        assert await plain_vm.devices() == {}
        await count_becomes(log, booted)
        # The freed port takes a new device, under a reused id.
        await plain_vm.add_disk(disk)
        assert await plain_vm.devices() == {"data": "hotplug0"}


@contextlib.asynccontextmanager
async def hot_added_nic(vm: VM, vm_dir: Path, mac: str) -> AsyncIterator[None]:
    """NIC "nic1" on a tap in a scratch netns, hot-added to `vm`; the netns goes afterwards."""
    netns_path = vm_dir / "netns" / "nic1"
    await netns.create(netns_path)
    try:
        await tap.create_tap(netns_path)
        fd = await tap.open_tap_fd(netns_path)
        try:
            await vm.add_nic(TapNic(fd, mac, id="nic1"))
        finally:
            os.close(fd)  # QEMU holds its own copy
        yield
    finally:
        await vm.kill()
        await netns.remove(netns_path)
        await netns.release_dir(netns_path.parent)


def test_a_tap_fd_reaches_qemu_under_uvloop(guest_assets: assets_mod.GuestAssets,
                                            vm_dir: Path) -> None:
    """The daemon runs uvloop, whose transports lack the socket object qemu.qmp's own fd
    passing reaches for: a hot-added NIC once failed there alone."""

    async def run() -> None:
        vm = VM(plain_spec(guest_assets, vm_dir))
        await vm.start()
        async with hot_added_nic(vm, vm_dir, "02:00:00:00:00:43"):
            assert await vm.devices() == {"nic1": "hotplug0"}

    uvloop.run(run())
