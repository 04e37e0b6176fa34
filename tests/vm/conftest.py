"""Fixtures for the sandbox tests: real guest assets, short-path VM state dirs that never leak a
QEMU, and a helper that builds a VMSpec for this host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from criserver.backends.microvm.guest import GuestBoot, pod_guest_spec
from criserver.vm import assets as assets_mod
from criserver.vm import process
from criserver.vm.accel import read_tsc_khz
from criserver.vm.qemu import SerialTransport, VMSpec
from guest import build as guestbuild

# Where the VM tests take their assets from: $CRISERVER_GUEST_ASSETS, else the installed ones,
# else a test build kept between sessions (the build is skipped when its inputs are unchanged).
TEST_ASSETS_DIR = Path("/var/tmp/criserver-test-guest")

# The HTTP/2 client preface plus an empty SETTINGS frame: the real agent answers it with its
# own SETTINGS, the stand-in agent greets any connection. Either way the guest sends bytes.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _find_or_build_assets() -> assets_mod.GuestAssets:
    env = os.environ.get("CRISERVER_GUEST_ASSETS")
    if env:
        return assets_mod.load(Path(env))
    try:
        return assets_mod.load(assets_mod.DEFAULT_ASSETS_DIR)
    except assets_mod.AssetsError:
        pass
    try:
        guestbuild.build(guestbuild.BuildConfig(assets_dir=TEST_ASSETS_DIR))
    except guestbuild.BuildError as e:
        pytest.skip(f"guest assets not installed and the test build failed: {e}")
    return assets_mod.load(TEST_ASSETS_DIR)


@pytest.fixture(scope="session")
def guest_assets() -> assets_mod.GuestAssets:
    return _find_or_build_assets()


@pytest.fixture(scope="session")
def tsc_khz() -> int | None:
    return read_tsc_khz()


def _kill_qemu_of(state_dir: Path) -> None:
    """Every QEMU whose pidfile is in `state_dir` or below (a machine daemon keeps one VM
    directory per machine there)."""
    for pidfile in state_dir.rglob("qemu.pid"):
        process.kill_all(pidfile)


def qemu_processes_of(state_dir: Path) -> list[int]:
    return process.qemu_pids(state_dir / "qemu.pid")


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    # Short path on purpose: Unix socket paths must stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="crivm-", dir="/tmp"))
    try:
        yield d
    finally:
        _kill_qemu_of(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_spec(
    guest_assets: assets_mod.GuestAssets, tsc_khz: int | None, vm_dir: Path
) -> Callable[..., VMSpec]:
    def make(module_groups: tuple[str, ...] = (), root_serial: str = "",
             **vm: Any) -> VMSpec:
        """A pod guest's spec; `root_serial` replaces the root disk's serial."""
        spec = pod_guest_spec(f"test-{vm_dir.name}", vm_dir, guest_assets,
                              SerialTransport(vm_dir / "agent.sock"),
                              GuestBoot(tsc_khz=tsc_khz, module_groups=module_groups), **vm)
        if root_serial:
            spec = dataclasses.replace(
                spec, disks=(dataclasses.replace(spec.disks[0], serial=root_serial),))
        return spec

    return make


async def first_guest_bytes(socket_path: Path, max_wait: float = 90.0) -> bytes:
    """Connect to the agent socket as the daemon would and return the guest's first bytes."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(H2_PREFACE)
        await writer.drain()
        async with asyncio.timeout(max_wait):
            data = await reader.read(64)
        return data
    finally:
        writer.close()
