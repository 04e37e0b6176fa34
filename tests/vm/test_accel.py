"""Accelerator choice and host TSC rate, probed for real on this host."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criserver import check
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend, MicroVMOptions
from criserver.config import Config, DaemonConfig
from criserver.errors import FailedPrecondition
from criserver.runtime.backend import BackendContext, DaemonShared
from criserver.runtime.undo import UndoStack
from criserver.store.records import PodRecord
from criserver.vm import accel
from criserver.vm.assets import GuestAssets
from tests.daemon import unmount_under
from tests.processes import running


def _read_cache_and_boot_id(state_dir: Path) -> tuple[dict[str, str], str]:
    cache = json.loads((state_dir / "accel.json").read_text())
    return cache, Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_tsc_khz_is_plausible() -> None:
    khz = accel.read_tsc_khz()
    assert khz is not None, "no TSC rate found in sysfs, the kernel log or /proc/cpuinfo"
    assert 500_000 <= khz <= 10_000_000


async def test_without_kvm_or_assets_is_tcg(tmp_path: Path) -> None:
    a = await accel.detect(tmp_path, None, use_cache=False)
    assert a.name == "tcg"
    assert a.reason


@pytest.mark.vm
async def test_probe_boots_for_real_and_is_cached(
    tmp_path: Path, guest_assets: GuestAssets
) -> None:
    first = await accel.detect(tmp_path, guest_assets)
    assert first.name in ("kvm", "tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert first.name == "tcg"
    else:
        # Either the probe saw the marker, or it says why not.
        assert "probe" in first.reason
    cache, boot_id = _read_cache_and_boot_id(tmp_path)
    assert cache["boot_id"] == boot_id
    assert cache["name"] == first.name
    second = await accel.detect(tmp_path, guest_assets)
    assert second.name == first.name and second.reason.endswith("(cached)")


@pytest.mark.vm
async def test_probe_marker_is_reached_under_tcg(tmp_path: Path, guest_assets: GuestAssets) -> None:
    # The probe's mechanics (boot to /init, marker, QEMU exit) checked with an accelerator that
    # works here: a broken probe would otherwise silently mean "no KVM" forever.
    result = await accel._probe(
        tmp_path, guest_assets, "qemu-system-x86_64", 60.0, accel_name="tcg"
    )
    assert result.name == "tcg" and "booted to /init" in result.reason


@pytest.mark.vm
def test_a_probe_dies_with_its_daemon(tmp_path: Path, guest_assets: GuestAssets) -> None:
    """The probe runs in the background after every start: a daemon killed meanwhile must not
    leave its QEMU behind (a hung KVM guest would run forever)."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from criserver.vm import accel, assets\n"
        "a = assets.load(Path(sys.argv[1]).parent, Path(sys.argv[1]).name)\n"
        # 600 s: the probe is still running when its parent is killed, whatever the host does.
        "asyncio.run(accel._probe(Path(sys.argv[2]), a, 'qemu-system-x86_64', 600.0,"
        " accel_name='tcg'))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(guest_assets.path),
                               str(tmp_path)])
    marker = "console=ttyS0 quiet panic=-1 criserver.probe=1"
    try:
        deadline = time.monotonic() + 30
        while not (probes := _probe_pids(marker, parent.pid)):
            assert time.monotonic() < deadline, "the probe's QEMU never started"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
    # Killed at once, well before its guest could boot and end it (>= 1.4 s under TCG here).
    deadline = time.monotonic() + 1.0
    while any(running(pid) for pid in probes):
        assert time.monotonic() < deadline, f"probe QEMU {probes} outlived its daemon"
        time.sleep(0.01)




def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text()
    except OSError:
        return ""


def _probe_pids(marker: str, parent: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        # comm: setpriv has set the death signal and exec'd QEMU.
        if marker in cmdline and ppid == parent and _comm(proc).startswith("qemu"):
            found.append(int(proc.name))
    return found


class _GatedProbe:
    """A stand-in for the probe boot: runs until released, counts the boots."""

    def __init__(self, verdict: accel.Accel) -> None:
        self.verdict = verdict
        self.release = asyncio.Event()
        self.boots = 0

    async def __call__(self, *args: object, **kwargs: object) -> accel.Accel:
        self.boots += 1
        await self.release.wait()
        return self.verdict


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_one_probe_at_a_time_and_its_verdict_is_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = _GatedProbe(accel.Accel("tcg", "stand-in probe"))
    monkeypatch.setattr(accel, "_probe", probe)
    assert not accel.probing(tmp_path) and accel.cached(tmp_path) is None
    first = asyncio.create_task(accel.detect(tmp_path, None))
    await _until(lambda: accel.probing(tmp_path))
    second = asyncio.create_task(accel.detect(tmp_path, None))  # e.g. `criserver check`
    await asyncio.sleep(3 * accel.LOCK_POLL)
    assert not first.done() and not second.done() and probe.boots == 1
    probe.release.set()
    assert (await first).reason == "stand-in probe"
    assert (await second).reason == "stand-in probe (cached)"
    assert probe.boots == 1 and not accel.probing(tmp_path)
    assert accel.cached(tmp_path) == accel.Accel("tcg", "stand-in probe (cached)")


async def test_backend_serves_while_probing_and_pods_wait_for_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = _GatedProbe(accel.Accel("tcg", "stand-in probe"))
    monkeypatch.setattr(accel, "_probe", probe)
    config = Config(daemon=DaemonConfig(root=str(tmp_path / "root"),
                                        state=str(tmp_path / "state")))
    context = BackendContext(handler="microvm", root=tmp_path / "root",
                             state=tmp_path / "state", config=config,
                             events=None)  # type: ignore[arg-type]
    backend = MicroVMBackend({"network": False, "templates": False,
                              "assets_dir": str(tmp_path / "no-assets")}, context)
    try:
        await asyncio.wait_for(backend.start([], []), 5)  # not held up by the probe
        info = (await backend.status()).info
        assert info["accelerator"] == "probing"
        pod = PodRecord(id="ab" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                        created_at=1)
        run = asyncio.create_task(backend.run_sandbox(pod, UndoStack("test")))
        await asyncio.sleep(0.2)
        assert not run.done()  # waiting for the verdict
        probe.release.set()
        with pytest.raises(FailedPrecondition):  # then on to its next step: no guest assets
            await run
        info = (await backend.status()).info
        assert (info["accelerator"], info["acceleratorReason"]) == ("tcg", "stand-in probe")
        # A daemon restart in the same host boot takes the cached verdict.
        await backend.close()
        context = dataclasses.replace(context, shared=DaemonShared())  # a new daemon
        backend = MicroVMBackend({"network": False, "templates": False,
                                  "assets_dir": str(tmp_path / "no-assets")}, context)
        await backend.start([], [])
        assert (await backend.host.accelerator()).reason == "stand-in probe (cached)"
        assert probe.boots == 1
    finally:
        await backend.close()
        unmount_under(tmp_path)  # the backend's private bind mount of its volumes root


def test_check_reports_probing_while_the_daemon_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(daemon=DaemonConfig(state=str(tmp_path)))
    state = tmp_path  # the daemon's VMHost keeps its verdict in the daemon's state dir
    options = MicroVMOptions(assets_dir=str(tmp_path / "no-assets"))
    with open(state / "accel.lock", "w") as held:  # what the daemon holds while it probes
        fcntl.flock(held, fcntl.LOCK_EX)
        result = check.check_accelerator(config, options)
    assert not result.ok and not result.required and result.detail.startswith("probing")
    monkeypatch.setattr(accel, "_probe", _GatedProbe(accel.Accel("tcg", "stand-in")))
    accel._probe.release.set()  # type: ignore[attr-defined]
    asyncio.run(accel.detect(state, None))
    result = check.check_accelerator(config, options)
    assert result.detail == "TCG (software emulation, slow): stand-in (cached)"


def test_handlers_of_one_daemon_share_one_host_and_one_network(tmp_path: Path) -> None:
    config = Config(daemon=DaemonConfig(root=str(tmp_path / "root"),
                                        state=str(tmp_path / "state")))
    shared = DaemonShared()

    def backend(handler: str, **options: object) -> MicroVMBackend:
        context = BackendContext(handler=handler, root=tmp_path / handler,
                                 state=tmp_path / "state" / handler, config=config,
                                 events=None, shared=shared)  # type: ignore[arg-type]
        return MicroVMBackend(dict(options), context)

    a, b = backend("a", accelerator="tcg"), backend("b", accelerator="tcg", default_vcpus=2)
    other_qemu = backend("c", accelerator="kvm")
    assert a.host is b.host and a.host is not other_qemu.host
    assert a.network is b.network is other_qemu.network
    assert a.network.netns_dir == tmp_path / "state" / "netns"
