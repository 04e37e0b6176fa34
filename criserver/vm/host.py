"""The host as every VM on it sees it, made once per daemon: the QEMU binary and its identity,
the accelerator (KVM proven by a probe boot, else TCG), the host TSC rate, kernel samepage
merging, and the guest assets.

Whatever runs VMs (the micro-VM backend's pods, later IRI machines) asks this object instead of
finding each fact again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from criserver.vm import accel, assets, ksm

log = logging.getLogger(__name__)

T = TypeVar("T")


class SharedObjects(Protocol):
    """What a daemon shares between the users of its VMs (runtime/backend.py's DaemonShared)."""

    def get(self, key: Hashable, make: Callable[[], T]) -> T: ...


def shared_host(shared: SharedObjects, state_dir: Path, *, qemu_binary: str, accelerator: str,
                assets_dir: Path, enable_ksm: bool) -> VMHost:
    """The daemon's one VMHost for this QEMU, accelerator, assets and KSM setting: pod handlers
    and machines configured alike share its KVM probe and facts."""
    return shared.get(
        (VMHost, qemu_binary, accelerator, str(assets_dir), enable_ksm),
        lambda: VMHost(state_dir, qemu_binary=qemu_binary, accelerator=accelerator,
                       assets_dir=assets_dir, enable_ksm=enable_ksm))


class VMHost:
    def __init__(self, state_dir: Path, *, qemu_binary: str = "qemu-system-x86_64",
                 accelerator: str = "auto", assets_dir: Path = assets.DEFAULT_ASSETS_DIR,
                 enable_ksm: bool = False) -> None:
        """`state_dir` keeps the accelerator's verdict for this host boot; `accelerator` is
        "auto" (probe), "kvm" or "tcg"."""
        self.state_dir = state_dir
        self.qemu_binary = qemu_binary
        self._wanted_accel = accelerator
        self._assets_dir = assets_dir
        self._enable_ksm = enable_ksm
        self.assets: assets.GuestAssets | None = None
        self.assets_error = "guest assets not loaded yet"
        self.tsc_khz: int | None = None
        self._accel: accel.Accel | None = None  # None while the KVM probe runs
        self._probe: asyncio.Task[accel.Accel] | None = None
        self._started: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Find the host's facts; once, however many users share this host. The KVM probe
        goes on in the background: only `accelerator()` waits for it."""
        if self._started is None:
            self._started = asyncio.create_task(self._start(), name="vm-host-start")
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        try:
            self.assets = await asyncio.to_thread(assets.load, self._assets_dir)
        except assets.AssetsError as exc:
            self.assets_error = exc.message
            log.warning("no guest assets: %s", exc.message)
        if self._wanted_accel in ("kvm", "tcg"):
            self._chosen(accel.Accel(self._wanted_accel, "set in the configuration"))
        else:
            self._probe = asyncio.create_task(self._run_probe(), name="kvm-probe")
        self.tsc_khz = await asyncio.to_thread(accel.read_tsc_khz)
        if self._enable_ksm:
            try:
                before = await asyncio.to_thread(ksm.enable)
                log.info("kernel samepage merging on (was %s)", before)
            except OSError as exc:
                log.warning("cannot turn on kernel samepage merging: %s", exc)

    async def close(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()  # the probe kills its QEMU on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def accelerator(self) -> accel.Accel:
        """The accelerator, once chosen: waits for the probe if it still runs."""
        if self._accel is not None:
            return self._accel
        assert self._probe is not None, "start() not called"
        # Shielded: a cancelled caller must not cancel the probe the next one awaits.
        return await asyncio.shield(self._probe)

    @property
    def accelerator_now(self) -> accel.Accel | None:
        """The accelerator if chosen already (None while the probe runs)."""
        return self._accel

    @property
    def ready(self) -> bool:
        return self.assets is not None and shutil.which(self.qemu_binary) is not None

    async def status(self) -> dict[str, Any]:
        """The host's facts for Status verbose."""
        chosen = self._accel
        return {
            "accelerator": chosen.name if chosen else "probing",
            "acceleratorReason": chosen.reason if chosen else
            "a KVM probe boot is running; VMs wait for its verdict",
            "tscKhz": self.tsc_khz,
            "ksm": await asyncio.to_thread(ksm.state),
            "qemu": qemu_identity(self.qemu_binary),
            "guestAssets": str(self.assets.path) if self.assets else self.assets_error,
            "guestKernel": self.assets.kernel_release if self.assets else "",
        }

    async def _run_probe(self) -> accel.Accel:
        try:
            chosen = await accel.detect(self.state_dir, self.assets,
                                        qemu_binary=self.qemu_binary)
        except Exception as exc:  # the probe's own failure must not leave VMs waiting
            log.exception("KVM probe failed")
            chosen = accel.Accel("tcg", f"KVM probe failed: {exc!r}")
        self._chosen(chosen)
        return chosen

    def _chosen(self, chosen: accel.Accel) -> None:
        self._accel = chosen
        if chosen.name == "tcg":
            log.warning("VMs run under TCG (software emulation): %s", chosen.reason)


@functools.lru_cache(maxsize=8)
def qemu_identity(name: str) -> str:
    """Which QEMU `name` is (path, size, mtime): a new QEMU may save other device state.
    Cached for the daemon's life: a QEMU upgraded under a running daemon is picked up at its
    restart, like the rest of its configuration."""
    qemu = shutil.which(name) or name
    try:
        st = os.stat(qemu)
    except OSError:
        return qemu
    return f"{os.path.realpath(qemu)}:{st.st_size}:{st.st_mtime_ns}"
