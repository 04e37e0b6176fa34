"""The tests' IronCore OS image end to end below the machine runtime: built here, pushed to a real
docker-registry, pulled through criserver's image service (auth included), made into a root disk
over a per-image base, and booted on the VM layer (q35, TCG) with its console answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from criserver.config import ImageConfig
from criserver.errors import FailedPrecondition
from criserver.image import ImageService
from criserver.image.auth import Credentials
from criserver.image.registry import AuthError
from criserver.machine.driver import HOSTNAME_FW_CFG, IGNITION_FW_CFG
from criserver.store.db import Database
from criserver.vm import disks
from criserver.vm.qemu import (
    DirectKernel,
    Disk,
    Firmware,
    FwCfgFile,
    Machine,
    RebootPolicy,
    VMSpec,
)
from criserver.vm.vm import VM
from tests.machine import os_image
from tests.machine.console import Console, wait_for_log
from tests.registry import PASSWORD, USER, Registry
from tests.vm.conftest import vm_dir  # noqa: F401 - a fixture: short path, no QEMU left

MiB = 1 << 20


@pytest.fixture(scope="module")
def files() -> os_image.OsImageFiles:
    return os_image.build()


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageService]:
    db = await Database.open(tmp_path / "db.sqlite")
    service = ImageService(ImageConfig(), tmp_path / "root", db)
    await service.start()
    try:
        yield service
    finally:
        await service.close()
        await db.close()


async def push(registry: Registry, files: os_image.OsImageFiles, repo: str,
               as_index: bool = False, disk_only: bool = False) -> str:
    async with aiohttp.ClientSession() as session:
        return await os_image.push(session, registry.base, repo, "v1", files,
                                   registry.authorization, as_index, disk_only)


async def test_pulled_from_a_real_registry(images: ImageService, registry: Registry,
                                           files: os_image.OsImageFiles) -> None:
    digest = await push(registry, files, "iri/test-os")
    image = await images.pull_os_image(f"{registry.host}/iri/test-os:v1")
    assert image.image_ref == f"{registry.host}/iri/test-os@{digest}" and image.id == digest
    assert image.command_line == os_image.COMMAND_LINE
    for got, built in ((image.kernel, files.kernel), (image.initramfs, files.initramfs),
                       (image.disk, files.disk)):
        assert got is not None and got.stat().st_size == built.stat().st_size
    assert image.disk is not None and image.disk.read_bytes() == files.disk.read_bytes()
    assert image.squashfs is None
    assert images.images() == []  # never a container image


async def test_index_form_and_auth(images: ImageService, auth_registry: Registry,
                                   files: os_image.OsImageFiles) -> None:
    """The spec's own shape (an index of osboot artifacts manifests) from a registry that
    wants credentials."""
    digest = await push(auth_registry, files, "iri/test-os", as_index=True)
    ref = f"{auth_registry.host}/iri/test-os:v1"
    with pytest.raises(AuthError):
        await images.pull_os_image(ref)
    image = await images.pull_os_image(ref, Credentials(USER, PASSWORD))
    assert image.image_ref == f"{auth_registry.host}/iri/test-os@{digest}"
    assert image.kernel is not None and image.disk is not None


# -- booting it ---------------------------------------------------------------------------------


@pytest.mark.vm
async def test_boots_from_its_layers_with_a_root_disk_over_the_base(
        images: ImageService, registry: Registry, files: os_image.OsImageFiles,
        vm_dir: Path) -> None:  # noqa: F811 - the fixture imported above
    await push(registry, files, "iri/boot-os")
    image = await images.pull_os_image(f"{registry.host}/iri/boot-os:v1")
    await images.use_os_image(image.id, "machine-1")
    assert image.kernel and image.initramfs and image.disk
    base = await disks.Bases(vm_dir / "bases").ensure(image.id.removeprefix("sha256:"),
                                                       image.disk)
    root = await disks.create(vm_dir / "root.qcow2", 64 * MiB, base)
    data = await disks.create(vm_dir / "data.qcow2", 16 * MiB)
    ignition = vm_dir / "ignition.json"
    ignition.write_text('{"ignition": {"version": "3.4.0"}}')
    spec = VMSpec(
        vm_id="os-image", state_dir=vm_dir, machine=Machine.Q35, reboot=RebootPolicy.RESET,
        boot=DirectKernel(image.kernel, image.initramfs,
                          f"{image.command_line} systemd.hostname=machine-one"),
        disks=(Disk("root", root.path, serial="root", read_only=False, format="qcow2"),),
        fw_cfg=(FwCfgFile(IGNITION_FW_CFG, ignition),),
        hotplug_slots=2, pvpanic=False, interactive_console=True)
    vm = VM(spec)
    await vm.start()
    try:
        log = await wait_for_log(spec.location.log_file, os_image.MARKER)
        ignition_bytes = len(ignition.read_bytes())
        assert f"{os_image.MARKER} hostname=machine-one ignition={ignition_bytes} disk=vda" in log
        reader, writer = await asyncio.open_unix_connection(str(spec.console_socket))
        console = Console.unix(reader, writer)
        assert await console.run("hostname") == "machine-one"
        assert await console.run(f"cat {os_image.IGNITION_PATH}") == ignition.read_text()
        assert await console.run("cat /mnt/disk/etc/iri-test-os") == os_image.DISK_MARKER
        assert await console.run("cat /sys/block/vda/size") == str(64 * MiB // 512)
        # A hot-added disk shows up, and grows live.
        data_disk = Disk("data", data.path, serial="data", read_only=False, format="qcow2")
        await vm.add_disk(data_disk)
        await console.until("cat /sys/block/vdb/size", str(16 * MiB // 512))
        await vm.resize_disk(data_disk, 32 * MiB)
        await console.until("cat /sys/block/vdb/size", str(32 * MiB // 512))
        # The file-level resize refuses a disk a running VM holds (that one is QMP's).
        with pytest.raises(FailedPrecondition, match="running VM"):
            await disks.resize(data.path, 64 * MiB)
        assert (await disks.inspect(data.path, "qcow2")).virtual_size == 32 * MiB
        writer.close()
        # The ACPI power button powers it off.
        await vm.press_power_button()
        assert await vm.wait_exited(30), "the guest ignored the power button"
    finally:
        await vm.kill()
    await images.release_os_image(image.id, "machine-1")


@pytest.mark.vm
async def test_disk_only_image_boots_through_firmware(
        images: ImageService, registry: Registry, files: os_image.OsImageFiles,
        vm_dir: Path) -> None:  # noqa: F811 - the fixture imported above
    """No kernel layer: SeaBIOS boots the disk made from disk.img (syslinux on it); the
    hostname comes through fw_cfg, as nothing can add to the command line."""
    await push(registry, files, "iri/firmware-os", disk_only=True)
    image = await images.pull_os_image(f"{registry.host}/iri/firmware-os:v1")
    assert image.kernel is None and image.initramfs is None and image.disk is not None
    base = await disks.Bases(vm_dir / "bases").ensure(image.id.removeprefix("sha256:"),
                                                       image.disk)
    root = await disks.create(vm_dir / "root.qcow2", 64 * MiB, base)
    hostname = vm_dir / "hostname"
    hostname.write_text("firmware-one")
    spec = VMSpec(
        vm_id="os-image-fw", state_dir=vm_dir, machine=Machine.Q35, reboot=RebootPolicy.RESET,
        boot=Firmware(),
        disks=(Disk("root", root.path, serial="root", read_only=False, format="qcow2"),),
        fw_cfg=(FwCfgFile(HOSTNAME_FW_CFG, hostname),), pvpanic=False)
    vm = VM(spec)
    await vm.start()
    try:
        log = await wait_for_log(spec.location.log_file, os_image.MARKER, max_wait=180)
        assert f"{os_image.MARKER} hostname=firmware-one ignition=0 disk=vda1" in log
    finally:
        await vm.kill()
