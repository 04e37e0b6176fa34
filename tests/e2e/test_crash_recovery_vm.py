"""The daemon SIGKILLed at each step of RunPodSandbox (a failpoint armed through its
environment), then restarted: start-up recovery finds what the dead daemon made (a QEMU that
outlived it, a netns, a CNI allocation, state dirs) and removes all of it, and the daemon runs
pods again."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from criserver.failpoints import ENV
from tests.cri_client import msg
from tests.daemon import Daemon
from tests.e2e.conftest import (
    microvm_config,
    network_names,
    qemu_pids,
    require_assets,
    short_workdir,
    tear_down,
)

pytestmark = pytest.mark.vm

STEPS = [
    "run_sandbox.netns",  # netns and tap made, no VM yet
    "vm.spawned",  # QEMU daemonized, its pid known to nobody but its pidfile
    "run_sandbox.vm_started",  # QEMU attached, guest booting
    "run_sandbox.network",  # CNI ADD done, guest agent up
    "run_sandbox.guest_set_up",  # everything made, the pod not yet recorded READY
]


def _qemus_of(workdir: Path) -> list[int]:
    return [pid for pid, cmd in qemu_pids().items() if str(workdir) in cmd]


def _leftovers(daemon: Daemon) -> list[str]:
    """What pods left in the backend's directories (the daemon's own files excepted)."""
    found: list[str] = []
    for base in (daemon.state / "runtimes" / "microvm", daemon.root / "runtimes" / "microvm"):
        for path in base.rglob("*"):
            daemon_own = path.name in ("accel.json", "accel.lock") or (
                path.is_dir() and path.name in ("volumes", "pods", "templates"))
            if not daemon_own:
                found.append(str(path.relative_to(base)))
    return found


@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_at_each_step_of_run_pod_sandbox_leaks_nothing(step: str) -> None:
    require_assets()
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, templates=False,
                                                   accelerator="tcg"))
    daemon.start(env={ENV: step})
    cri = daemon.client()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cri.run_pod("crash")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert daemon.process is not None
        assert daemon.process.wait(30) == -signal.SIGKILL
        assert f"failpoint {step} reached" in daemon.log()
        if step != "run_sandbox.netns":
            assert _qemus_of(workdir), "the QEMU should have outlived the daemon"

        daemon.start()  # no failpoint: recovery runs
        await cri.close()
        cri = daemon.client()
        assert "cleaning up pod interrupted during creation" in daemon.log()
        assert not (await cri.runtime.ListPodSandbox()).items
        assert _qemus_of(workdir) == []
        assert _leftovers(daemon) == []
        assert list((daemon.state / "netns").iterdir()) == []
        network = network_names(daemon)[0]
        allocations = [p.name for p in (Path("/var/lib/cni/networks") / network).glob("*")
                       if p.name[0].isdigit()]
        assert allocations == []

        # Recovered, not just cleaned: a pod runs and goes again.
        pod_id = await cri.run_pod("after-crash")
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
        assert _qemus_of(workdir) == []
    finally:
        await cri.close()
        tear_down(daemon, workdir)
