"""The warm pool (microvm option `warm_pool`) on real micro-VMs: a pod takes a pooled VM that
has run a container already, becomes a pod like any other (its hostname, DNS, IP, containers,
exec), survives a daemon restart, and leaves nothing behind; a crashed daemon's pooled VMs are
killed at the next start."""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon
from tests.e2e.conftest import (
    backend_leftovers,
    qemus_of,
    running_vm_daemon,
    vm_pids_of,
    wait_pool_filled,
)
from tests.processes import thread_niceness

pytestmark = pytest.mark.vm

@pytest.fixture(scope="module")
def pool_daemon() -> Iterator[Daemon]:
    with running_vm_daemon(warm_pool=1) as daemon:
        yield daemon


@pytest.fixture(scope="module")
async def pulled(pool_daemon: Daemon, busybox_ref: str) -> AsyncIterator[str]:
    """busybox pulled, and a first pod run and removed: the pool has a shape to fill."""
    cri = pool_daemon.client()
    await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=busybox_ref)))
    first = await cri.run_pod("pool-first")
    await _remove_pod(cri, first)
    await cri.close()
    yield busybox_ref


def _pool_dirs(daemon: Daemon) -> set[str]:
    state = daemon.state / "runtimes" / "microvm"
    return {p.name for p in state.iterdir() if p.name.startswith("pool-") and not p.is_symlink()}


def _pool_netns(daemon: Daemon) -> set[str]:
    return {p.name for p in daemon.state.rglob("netns/pool-*")}


async def _remove_pod(cri: CRIClient, pod_id: str) -> None:
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))


async def _exec(cri: CRIClient, cid: str, *cmd: str) -> str:
    r = await cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid, cmd=list(cmd),
                                       timeout=30))
    assert r.exit_code == 0, r.stderr
    return str(r.stdout.decode())


async def test_a_pod_takes_a_warmed_vm_and_is_a_pod_like_any_other(
        pool_daemon: Daemon, pulled: str, tmp_path: Path) -> None:
    cri = pool_daemon.client()
    await wait_pool_filled(cri)
    [pooled] = _pool_dirs(pool_daemon)
    qemu = int((pool_daemon.state / "runtimes" / "microvm" / pooled / "qemu.pid").read_text())
    # Waiting, it warmed at the lowest CPU priority; a pod's VM runs at the daemon's.
    assert set(thread_niceness(qemu).values()) == {19}
    pod_id = await cri.run_pod(
        "pooled", hostname="pooled-host", log_directory=str(tmp_path),
        dns_config=msg("DNSConfig", servers=["10.96.0.10"], searches=["svc.local"]))
    r = await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest",
                                               pod_sandbox_id=pod_id, verbose=True))
    info = json.loads(r.info["info"])
    assert info["warmPoolVM"] == pooled
    ip = r.status.network.ip
    link = pool_daemon.state / "runtimes" / "microvm" / pod_id[:16]
    assert link.is_symlink() and link.resolve().name == pooled
    assert set(thread_niceness(qemu).values()) == {os.getpriority(os.PRIO_PROCESS,
                                                                  pool_daemon.pid)}
    assert vm_pids_of(pod_id) == [qemu]  # the tests' one way to find a pod's QEMU
    assert f"netns/{pod_id}" in info["netns"] and not _pool_netns(pool_daemon) - _pool_dirs(
        pool_daemon)

    cid = await cri.create_container(pod_id, "c", pod_name="pooled", image=pulled,
                                     command=["sleep", "3600"], log_path="c.log")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert (await _exec(cri, cid, "hostname")).strip() == "pooled-host"
    assert "nameserver 10.96.0.10" in await _exec(cri, cid, "cat", "/etc/resolv.conf")
    assert f"inet {ip}/" in await _exec(cri, cid, "ip", "-4", "addr", "show", "eth0")
    # The warm-up container is gone: the pod's container is the only one in the guest.
    listed = await cri.runtime.ListContainers(msg("ListContainersRequest"))
    assert [c.id for c in listed.containers] == [cid]
    assert "warm-up" not in await _exec(cri, cid, "cat", "/proc/mounts")
    # The refill warms its VM on the image the last container used (its first container's
    # rootfs then finds that image mounted).
    await wait_pool_filled(cri)
    snapshot = Path(json.loads((await cri.runtime.ContainerStatus(msg(
        "ContainerStatusRequest", container_id=cid, verbose=True))).info["info"])[
        "snapshot"]).name
    assert re.search(rf"pooled vm ready name=pool-\w+ .* image={snapshot}", pool_daemon.log())

    # A daemon restart adopts the pod through its link; the pool is warmed again.
    await cri.close()
    assert pool_daemon.stop() == 0
    assert not _pool_dirs(pool_daemon) - {pooled}, "the stopping daemon left pooled VMs"
    pool_daemon.start()
    cri = pool_daemon.client()
    r = await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id))
    assert r.status.state == enum("SANDBOX_READY")
    assert (await _exec(cri, cid, "hostname")).strip() == "pooled-host"

    await _remove_pod(cri, pod_id)
    assert not link.exists() and not link.is_symlink()
    assert pooled not in _pool_dirs(pool_daemon)
    assert not any(pod_id[:16] in p for p in backend_leftovers(pool_daemon))
    await cri.close()


async def test_a_crashed_daemons_pooled_vms_go_at_the_next_start(
        pool_daemon: Daemon, pulled: str) -> None:
    cri = pool_daemon.client()
    pod_id = await cri.run_pod("refill")  # the pool fills for its shape
    await wait_pool_filled(cri)
    await cri.close()
    [pooled] = _pool_dirs(pool_daemon) - {p.resolve().name for p in
                                         (pool_daemon.state / "runtimes" / "microvm").iterdir()
                                         if p.is_symlink()}
    before = set(qemus_of(pool_daemon.workdir))
    pool_daemon.kill()  # SIGKILL: the pooled VM's QEMU outlives it
    assert set(qemus_of(pool_daemon.workdir)) == before
    pool_daemon.start()
    assert pooled not in _pool_dirs(pool_daemon)
    assert pooled not in _pool_netns(pool_daemon)
    assert len(set(qemus_of(pool_daemon.workdir)) & before) == len(before) - 1  # the pod's stays
    cri = pool_daemon.client()
    await _remove_pod(cri, pod_id)
    await cri.close()
