"""Pick QEMU's accelerator (KVM only when a real boot proves it works, else TCG) and read the
host TSC rate the guest kernel needs under TCG.

The KVM probe boots the guest kernel once and caches the verdict per host boot. One probe runs at
a time per state dir, whoever starts it (the daemon, in the background, or `criserver check`):
the others wait for its verdict, or see that it is `probing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

from criserver import files
from criserver.vm.assets import GuestAssets

log = logging.getLogger(__name__)

PROBE_MARKER = b"CRISERVER_PROBE_OK"
PROBE_TIMEOUT = 8.0  # KVM reaches /init in well under a second; nested KVM here never does
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_CACHE_NAME = "accel.json"
_LOCK_NAME = "accel.lock"  # held while a probe runs
LOCK_POLL = 0.1


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg", as QEMU's -accel wants it
    reason: str


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def read_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, or None when it cannot be found.

    Under TCG the guest reads the host's TSC, so the guest's early calibration must be told the
    host rate. Sources, best first:
    1. sysfs tsc_freq_khz (exact, but only some kernels/drivers provide it);
    2. the kernel log's "tsc: Refined TSC clocksource calibration" (measured against a reference
       clock after boot) or "tsc: Detected ... MHz" (what the kernel itself uses);
    3. /proc/cpuinfo "cpu MHz" of cpu0: the current clock, equal to the TSC rate on CPUs with
       constant_tsc unless frequency scaling moved it, so only a fallback.
    The model-name GHz is not used: it is the nominal clock, not necessarily the TSC's.
    """
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    with contextlib.suppress(OSError, ValueError):
        return int(sysfs.read_text().strip())
    with contextlib.suppress(OSError):
        kmsg = _read_kernel_log()
        for pattern in (
            r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz",
            r"tsc: Detected (\d+)\.(\d{3}) MHz",
        ):
            found = re.findall(pattern, kmsg)
            if found:
                mhz, frac = found[-1]
                return int(mhz) * 1000 + int(frac)
    with contextlib.suppress(OSError):
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return round(float(m.group(1)) * 1000)
    return None


def _read_kernel_log() -> str:
    # /dev/kmsg gives the whole ring buffer without spawning dmesg; non-blocking so the read
    # stops at the end of the buffer instead of waiting for new messages.
    lines = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten while reading; skip it
                continue
            if not rec:
                break
            lines.append(rec.decode(errors="replace"))
            if len(lines) > 20000:
                break
    finally:
        os.close(fd)
    return "".join(lines)


async def detect(
    state_dir: Path,
    assets: GuestAssets | None,
    *,
    qemu_binary: str = "qemu-system-x86_64",
    probe_wait: float = PROBE_TIMEOUT,
    use_cache: bool = True,
) -> Accel:
    """Return the accelerator to use, probing KVM at most once per host boot.

    Without assets (nothing to boot) KVM cannot be proven and TCG is chosen. While another
    process probes, this waits for its verdict instead of booting a second probe.
    """
    if use_cache and (found := await asyncio.to_thread(cached, state_dir, qemu_binary)):
        return found
    async with _probe_lock(state_dir):
        if use_cache and (found := await asyncio.to_thread(cached, state_dir, qemu_binary)):
            return found  # probed by another process while we waited for the lock
        accel = await _probe(state_dir, assets, qemu_binary, probe_wait)
        log.info("accelerator chosen accel=%s reason=%r", accel.name, accel.reason)
        data = {"boot_id": _boot_id(), "qemu_binary": qemu_binary, **asdict(accel)}
        await asyncio.to_thread(files.write_atomic, state_dir / _CACHE_NAME,
                                json.dumps(data) + "\n")
    return accel


def cached(state_dir: Path, qemu_binary: str = "qemu-system-x86_64") -> Accel | None:
    """The verdict probed earlier in this host boot for `qemu_binary`, if any."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads((state_dir / _CACHE_NAME).read_text())
        if data["boot_id"] == _boot_id() and data["qemu_binary"] == qemu_binary:
            return Accel(name=data["name"], reason=data["reason"] + " (cached)")
    return None


def probing(state_dir: Path) -> bool:
    """Whether a probe is running now for this state dir (in this or another process)."""
    try:
        fd = os.open(state_dir / _LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock taken
    return False


@contextlib.asynccontextmanager
async def _probe_lock(state_dir: Path) -> AsyncIterator[None]:
    """Hold the state dir's probe lock (an flock, so it is released if the holder dies).
    Polled rather than blocked on, so a cancelled waiter leaves no thread behind."""
    path = state_dir / _LOCK_NAME

    def open_lock() -> int:
        state_dir.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    fd = await asyncio.to_thread(open_lock)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)


async def _probe(
    state_dir: Path,
    assets: GuestAssets | None,
    qemu_binary: str,
    probe_wait: float,
    accel_name: str = "kvm",
) -> Accel:
    """Boot the guest kernel with `accel_name` (tests use "tcg" to check the probe itself)."""
    if accel_name == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "/dev/kvm missing or not accessible")
    if assets is None:
        return Accel("tcg", "no guest assets to boot a KVM probe")
    tsc = read_tsc_khz()
    cmdline = "console=ttyS0 quiet panic=-1 criserver.probe=1" + (
        f" tsc_early_khz={tsc}" if tsc else ""
    )
    # Boot the kernel + initramfs only; /init prints the marker and reboots (-> QEMU exits).
    # No -cpu host: it aborts QEMU under nested KVM; the default CPU is enough to prove a boot.
    # setpriv --pdeathsig: a daemon killed during the probe takes its QEMU along (a hung KVM
    # guest never exits by itself), as the probe runs in the background after every start.
    # fmt: off
    argv = [
        "setpriv", "--pdeathsig", "KILL", "--",
        qemu_binary, "-machine", "microvm,acpi=on", "-accel", accel_name, "-m", "128",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initramfs),
        "-append", cmdline,
        "-serial", "stdio",
    ]
    # fmt: on
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(probe_wait):
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = seen[-4096:] + chunk
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    elapsed = time.monotonic() - t0
    if PROBE_MARKER in seen:
        return Accel(accel_name, f"{accel_name} probe booted to /init in {elapsed:.2f}s")
    tail = seen[-200:].decode(errors="replace").strip().replace("\n", " | ")
    return Accel("tcg", f"{accel_name} probe did not reach /init within {elapsed:.1f}s: {tail!r}")
