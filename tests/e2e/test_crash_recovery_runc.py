"""Crash at every step, the runc host backend (issue 18): the daemon SIGKILLs itself at a named
point of RunPodSandbox, CreateContainer, StartContainer or RemovePodSandbox (a failpoint armed
through its environment), is started again, and then what it lists is what exists on the host
(no ctrmon or runc container, netns, namespace pin, mount, cgroup, CNI allocation or state dir
of an object it does not list), the call's object is complete or gone, the same names work
again, and once every pod is removed nothing is left. No VM is booted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from criserver.failpoints import ENV
from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon, process_cmdlines
from tests.e2e.conftest import network_names, tear_down
from tests.e2e.test_runc_host import ctrmon, pod_linux, runc_daemon_config  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root")

RUN_STEPS = [
    "runc_run_sandbox.namespaces",  # netns, uts/ipc pins, /dev/shm; no CNI ADD, no infra
    "runc_run_sandbox.infra_created",  # infra's monitor and runc container made, not started
    "runc_run_sandbox.set_up",  # everything made, the pod not yet recorded READY
]
CREATE_STEPS = [
    "runc_create_container.rootfs",  # image and overlay mounted, no bundle or monitor
    "runc_create_container.monitor_started",  # runc created under its monitor, record INIT
]
START_STEPS = [
    "runc_start_container.started",  # running, the record CREATED
]
REMOVE_STEPS = [
    "runc_remove_sandbox.stopped",  # containers and infra killed, network down; files there
    "runc_remove_sandbox.files",  # nothing left but the record
]
STEPS = RUN_STEPS + CREATE_STEPS + START_STEPS + REMOVE_STEPS
HEX = re.compile(r"[0-9a-f]{16,64}")


@pytest.fixture
def node(ctrmon: Path) -> Iterator[Daemon]:  # noqa: F811
    workdir = Path(tempfile.mkdtemp(prefix="crc-", dir="/tmp"))
    daemon = Daemon(workdir, config=runc_daemon_config(workdir, ctrmon))
    try:
        yield daemon
    finally:
        tear_down(daemon, workdir)


async def _listed(cri: CRIClient) -> tuple[dict[str, int], dict[str, int]]:
    pods = {p.id: p.state for p in (await cri.runtime.ListPodSandbox()).items}
    containers = {c.id: c.state for c in (await cri.runtime.ListContainers()).containers}
    return pods, containers


def _mounts_under(workdir: Path) -> set[str]:
    return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{workdir}/")}


def _host_objects(daemon: Daemon) -> dict[str, set[str]]:
    """What the daemon's runc pods hold on the host, each named by the ID it belongs to."""
    workdir = str(daemon.workdir)
    found: dict[str, set[str]] = {"monitors": set(), "runc": set(), "cgroups": set(),
                                  "ips": set(), "names": set()}
    for cmd in process_cmdlines().values():
        if "ctrmon" in cmd and workdir in cmd and (m := re.search(r"--id (\S+)", cmd)):
            found["monitors"].add(m[1].removeprefix("pod-"))
    runc_roots = list(daemon.state.rglob("runc"))
    for root in runc_roots:
        out = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True,
                             text=True).stdout
        found["runc"] |= {line.removeprefix("pod-") for line in out.split()}
    logged = daemon.log()  # the host's other pods' cgroups are not this daemon's
    for group in [*Path("/sys/fs/cgroup").glob("*/criserver/*"),
                  *Path("/sys/fs/cgroup").glob("criserver/*")]:
        if group.is_dir() and group.name in logged:
            found["cgroups"].add(group.name)
    network = network_names(daemon)[0]
    for ip in (Path("/var/lib/cni/networks") / network).glob("*.*.*.*"):
        found["ips"].add(ip.read_text().split()[0])
    # Files and directories (netns, pins, bundles, pod dirs, layers) named after an ID; the
    # image store's blobs and snapshots are named after digests, not pods.
    for top in (daemon.state, daemon.root):
        for path in top.rglob("*"):
            if "image" in path.relative_to(top).parts[:1] or path.parent.name == "images":
                continue  # digests; the images' shared mounts are checked with the mounts
            found["names"] |= {f"{n} ({path})" for n in HEX.findall(path.name)}
    return found


def _unlisted(found: dict[str, set[str]], ids: set[str]) -> dict[str, set[str]]:
    """Of `found`, what belongs to no listed pod or container (an ID or its prefix)."""
    def owned(name: str) -> bool:
        return any(i.startswith(name.split()[0]) for i in ids)
    return {kind: bad for kind, names in found.items()
            if (bad := {n for n in names if not owned(n)})}


async def _crash(daemon: Daemon, step: str, call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert daemon.process is not None
    assert daemon.process.wait(30) == -signal.SIGKILL
    assert f"failpoint {step} reached" in daemon.log()


@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_at_each_step_of_the_runc_backend_leaks_nothing(
        node: Daemon, busybox_ref: str, tmp_path: Path, step: str) -> None:
    logs = tmp_path / "logs"
    daemon = node.start()
    cri = daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest",
                                      image=msg("ImageSpec", image=busybox_ref)))
        # A first pod makes what the daemon keeps for good (shared mount points).
        warm = await cri.run_pod("warm", linux=pod_linux())
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=warm))
        baseline = _mounts_under(daemon.workdir)

        def config() -> object:
            return cri.container_config("ctr", image=busybox_ref, command=["sleep", "3600"],
                                        log_path="ctr.log")

        async def create(pod_id: str) -> str:
            reply = await cri.runtime.CreateContainer(msg(
                "CreateContainerRequest", pod_sandbox_id=pod_id, config=config(),
                sandbox_config=cri.pod_config("crash", log_directory=str(logs))))
            return str(reply.container_id)

        pod_id = cid = ""
        daemon.stop()
        daemon.start(env={ENV: step})
        await cri.close()
        cri = daemon.client()
        if step in RUN_STEPS:
            call = cri.run_pod("crash", linux=pod_linux(), log_directory=str(logs))
        else:
            pod_id = await cri.run_pod("crash", linux=pod_linux(), log_directory=str(logs))
            if step in CREATE_STEPS:
                call = create(pod_id)
            elif step in START_STEPS:
                cid = await create(pod_id)
                call = cri.runtime.StartContainer(msg("StartContainerRequest",
                                                      container_id=cid))
            else:
                cid = await create(pod_id)
                await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
                call = cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                        pod_sandbox_id=pod_id))
        await _crash(daemon, step, call)
        await cri.close()

        daemon.start()  # nothing armed: recovery runs
        cri = daemon.client()
        pods, containers = await _listed(cri)
        leaked = _unlisted(_host_objects(daemon), {*pods, *containers})
        assert leaked == {}, f"left by a crash at {step}: {leaked}"
        if step in RUN_STEPS:
            assert pods == {}
        elif step in CREATE_STEPS:
            assert pods == {pod_id: enum("SANDBOX_READY")} and containers == {}
        elif step in START_STEPS:
            # It runs: recorded RUNNING, followed (its exit is seen), not CREATED for good.
            assert containers == {cid: enum("CONTAINER_RUNNING")}
            await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid,
                                                timeout=0))
            status = (await cri.runtime.ContainerStatus(
                msg("ContainerStatusRequest", container_id=cid))).status
            assert status.state == enum("CONTAINER_EXITED") and status.exit_code == 137
            assert 0 < status.started_at <= status.finished_at  # when its process began
            await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
        else:
            # The record outlived the call: kubelet removes the pod again, and that completes.
            assert set(pods) == {pod_id}
            await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                   pod_sandbox_id=pod_id))
            assert await _listed(cri) == ({}, {})

        # The same names work again: the pod (if gone) and its container, started and exec'd.
        pods, _ = await _listed(cri)
        pod_id = next(iter(pods), "") or await cri.run_pod(
            "crash", linux=pod_linux(), log_directory=str(logs))
        cid = await create(pod_id)
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        r = await cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid,
                                           cmd=["echo", "again"], timeout=10))
        assert r.exit_code == 0 and r.stdout == b"again\n"

        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
        assert _unlisted(_host_objects(daemon), set()) == {}
        assert _mounts_under(daemon.workdir) == baseline
    finally:
        await cri.close()
