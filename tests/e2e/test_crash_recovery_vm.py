"""The daemon SIGKILLed at each step of RunPodSandbox (a failpoint armed through its
environment), then restarted: start-up recovery finds what the dead daemon made (a QEMU that
outlived it, a netns, a CNI allocation, state dirs) and removes all of it, and the daemon runs
pods again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from criserver.failpoints import ENV
from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon, built_templates
from tests.e2e.conftest import (
    backend_leftovers,
    iptables_rules,
    microvm_config,
    network_names,
    qemus_of,
    require_assets,
    short_workdir,
    tear_down,
    wait_pool_filled,
)
from tests.image.oci import Pusher
from tests.registry import Registry, small_image

pytestmark = pytest.mark.vm

STEPS = [
    "run_sandbox.netns",  # netns and tap made, no VM yet
    "vm.spawned",  # QEMU daemonized, its pid known to nobody but its pidfile
    "run_sandbox.vm_started",  # QEMU attached, guest booting
    "run_sandbox.network",  # CNI ADD done, guest agent up
    "run_sandbox.guest_set_up",  # everything made, the pod not yet recorded READY
]


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
            assert qemus_of(workdir), "the QEMU should have outlived the daemon"

        daemon.start()  # no failpoint: recovery runs
        await cri.close()
        cri = daemon.client()
        assert "cleaning up pod interrupted during creation" in daemon.log()
        assert not (await cri.runtime.ListPodSandbox()).items
        assert qemus_of(workdir) == []
        assert backend_leftovers(daemon) == []
        assert list((daemon.state / "netns").iterdir()) == []
        network = network_names(daemon)[0]
        allocations = [p.name for p in (Path("/var/lib/cni/networks") / network).glob("*")
                       if p.name[0].isdigit()]
        assert allocations == []

        # Recovered, not just cleaned: a pod runs and goes again.
        pod_id = await cri.run_pod("after-crash")
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
        assert qemus_of(workdir) == []
    finally:
        await cri.close()
        tear_down(daemon, workdir)


# -- every other call: one daemon, one pod booted for all the container cases -----------------
# The VM outlives each crash and is adopted at restart, so a container case boots nothing; a
# case that stops or removes the pod boots its successor (same name and attempt) and hands it on.

CONTAINER_STEPS = [
    "create_container.volumes",  # bind mounts made, the guest not asked
    "create_container.guest_created",  # made in the guest, the record INIT
    "create_container.spec_written",  # all made, the record not yet CREATED
    "start_container.guest_started",  # running in the guest, the record CREATED
]
REMOVE_CONTAINER_STEPS = [
    "remove_container.guest_delete_queued",  # the guest's delete marked, the record there
]
POD_STEPS = [
    "stop_sandbox.vm_stopped",  # QEMU gone, network and record still there
    "stop_sandbox.network_down",  # all of it gone, the record still READY
    "remove_sandbox.stopped",  # stopped, containers removed, files and record there
    "remove_sandbox.volumes",  # volumes gone, state and root dirs and record there
    "remove_sandbox.files",  # nothing left but the record
]
PULL_STEPS = [
    "pull.layer_partial",  # a temp blob half written
    "pull.layer_stored",  # a layer committed, no manifest
    "pull.content_stored",  # every blob, no snapshot or record
    "image.snapshot_built",  # snapshot and blobs, no record
]


@dataclass
class Node:
    daemon: Daemon
    workdir: Path
    image: str
    volume: Path
    pod_id: str = ""

    async def crash_in(self, step: str, call: Callable[[CRIClient], Awaitable[object]]) -> None:
        """Restart the daemon with `step` armed, make `call` die there, start it again."""
        self.daemon.stop()  # SIGTERM: the VM stays and is adopted at the next start
        self.daemon.start(env={ENV: step})
        cri = self.daemon.client()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(cri)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await cri.close()
        assert self.daemon.process is not None
        assert self.daemon.process.wait(30) == -signal.SIGKILL
        assert f"failpoint {step} reached" in self.daemon.log()
        self.daemon.start()

    def container_config(self, cri: CRIClient, name: str = "ctr") -> Any:
        return cri.container_config(
            name, image=self.image, command=["sleep", "3600"],
            mounts=[msg("Mount", container_path="/data", host_path=str(self.volume))])

    async def create(self, cri: CRIClient, name: str = "ctr") -> str:
        response = await cri.runtime.CreateContainer(msg(
            "CreateContainerRequest", pod_sandbox_id=self.pod_id,
            config=self.container_config(cri, name), sandbox_config=cri.pod_config(POD)))
        return str(response.container_id)


POD = "crash-pod"


@pytest.fixture(scope="module")
async def node(busybox_ref: str) -> AsyncIterator[Node]:
    require_assets()
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, templates=False,
                                                   accelerator="tcg"))
    daemon.start()
    volume = workdir / "data"
    volume.mkdir()
    node = Node(daemon, workdir, busybox_ref, volume)
    cri = daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec",
                                                                    image=busybox_ref)))
        node.pod_id = await cri.run_pod(POD)
        yield node
    finally:
        await cri.close()
        tear_down(daemon, workdir)


async def _consistent(node: Node, cri: CRIClient) -> list[Any]:
    """What the daemon lists is what exists: one QEMU per ready pod and none else, a netns and
    an IP per ready pod and none without a netns (a pod not ready because its VM is gone
    keeps its network until StopPodSandbox, as when a VM dies under a running daemon), a spec
    file, offset file and volume mount only for listed containers, no directory of an unlisted
    pod, no iptables rule of a pod without a netns. Returns the containers listed."""
    pods = (await cri.runtime.ListPodSandbox()).items
    ready = {p.id for p in pods if p.state == enum("SANDBOX_READY")}
    containers = (await cri.runtime.ListContainers()).containers
    listed = {c.id for c in containers}
    assert len(qemus_of(node.workdir)) == len(ready)
    netns = {p.name for p in (node.daemon.state / "netns").iterdir()}
    assert ready <= netns <= {p.id for p in pods}
    network = network_names(node.daemon)[0]
    owners = [p.read_text().split()[0] for p in (Path("/var/lib/cni/networks") / network).glob("*")
              if p.name[0].isdigit()]
    # One IP per ready pod; a stop cut short may have released a pod's IP (CNI DEL runs while
    # its VM goes) before its netns: never an IP without a netns.
    assert len(owners) == len(set(owners)) and ready <= set(owners) <= netns
    for rule in await iptables_rules():  # CNI's masquerade chains name the pod's id
        assert network not in rule or any(pod_id in rule for pod_id in netns), rule
    state = node.daemon.state / "runtimes" / "microvm"
    root = node.daemon.root / "runtimes" / "microvm"
    pod_ids = {p.id for p in pods}
    pod_dirs = list((root / "pods").iterdir()) if (root / "pods").exists() else []
    assert {p.name for p in pod_dirs} <= pod_ids
    for pod_dir in pod_dirs:
        assert {f.stem for f in pod_dir.glob("*.json")} <= listed, "spec file of no container"
    for offset in state.glob("*/*.offset"):
        assert any(c.startswith(offset.stem) for c in listed), f"offset file {offset}"
    for mount in _mounts_under(state / "volumes"):
        rel = Path(mount).relative_to(state / "volumes")
        if len(rel.parts) <= 1:
            continue  # the volumes root and the pods' directories
        assert any(c[:16] in rel.parts[1] or rel.parts[1].startswith(c) for c in listed), \
            f"volume mount {mount} of no listed container"
    return list(containers)


def _mounts_under(base: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(base) or point.startswith(f"{base}/"):
            found.append(point)
    return found


def _blobs(daemon: Daemon) -> tuple[set[str], set[str]]:
    image = daemon.root / "image"
    return ({p.name for p in (image / "blobs" / "sha256").iterdir()},
            {p.name for p in (image / "snapshots").iterdir()})


@pytest.mark.parametrize("step", CONTAINER_STEPS)
async def test_a_crash_in_create_or_start_container_leaks_nothing(node: Node, step: str) -> None:
    async def create_and_start(cri: CRIClient) -> None:
        container_id = await node.create(cri)
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=container_id))

    await node.crash_in(step, create_and_start)
    cri = node.daemon.client()
    try:
        assert "cleaning up" in node.daemon.log() or step.startswith("start_container")
        containers = await _consistent(node, cri)
        # Complete or cleaned: never CREATED while it runs in the guest.
        for container in containers:
            assert container.state in (enum("CONTAINER_RUNNING"),
                                       enum("CONTAINER_EXITED")), container
            await cri.runtime.StopContainer(msg("StopContainerRequest",
                                                container_id=container.id, timeout=0))
            await cri.runtime.RemoveContainer(msg("RemoveContainerRequest",
                                                  container_id=container.id))
        # The same name again: created, started, running, removed.
        container_id = await node.create(cri)
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=container_id))
        status = await cri.runtime.ContainerStatus(msg("ContainerStatusRequest",
                                                       container_id=container_id))
        assert status.status.state == enum("CONTAINER_RUNNING")
        await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=container_id,
                                            timeout=0))
        await cri.runtime.RemoveContainer(msg("RemoveContainerRequest",
                                              container_id=container_id))
        assert await _consistent(node, cri) == []
    finally:
        await _remove_containers(cri)  # a failed case must not fail the next ones
        await cri.close()


async def test_a_crash_once_remove_container_queued_the_guest_delete_repeats_it(
        node: Node) -> None:
    """RemoveContainer answers before the guest deletes (its marker written first): a daemon
    that dies there leaves the record, and the next one finishes the guest's delete when it
    adopts the pod; removing the container again then completes."""
    cri = node.daemon.client()
    try:
        container_id = await node.create(cri)
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=container_id))
        await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=container_id,
                                            timeout=0))
        assert "guestStatus" in await _verbose_info(cri, container_id)  # the guest has it
    finally:
        await cri.close()
    done = f"guest delete done container={container_id}"
    await node.crash_in(REMOVE_CONTAINER_STEPS[0], lambda cri: cri.runtime.
                        RemoveContainer(msg("RemoveContainerRequest",
                                            container_id=container_id)))
    markers = node.daemon.state / "runtimes" / "microvm" / node.pod_id[:16] / "deleting"
    cri = node.daemon.client()
    try:
        await _wait_for_log(node, done, 1)
        assert f"guest delete resumed container={container_id}" in node.daemon.log()
        containers = await _consistent(node, cri)
        assert [c.id for c in containers] == [container_id]  # the record outlived the crash
        assert "guestStatus" not in await _verbose_info(cri, container_id)  # the guest's is gone
        await cri.runtime.RemoveContainer(msg("RemoveContainerRequest",
                                              container_id=container_id))
        await _wait_for_log(node, done, 2)  # the agent's delete of nothing is a delete too
        assert await _consistent(node, cri) == []
        assert list(markers.iterdir()) == []
    finally:
        await _remove_containers(cri)
        await cri.close()


async def _verbose_info(cri: CRIClient, container_id: str) -> dict[str, Any]:
    status = await cri.runtime.ContainerStatus(msg("ContainerStatusRequest",
                                                   container_id=container_id, verbose=True))
    info: dict[str, Any] = json.loads(status.info["info"])
    return info


async def _wait_for_log(node: Node, line: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while node.daemon.log().count(line) < count:
        assert time.monotonic() < deadline, f"no {line!r} in the daemon log"
        await asyncio.sleep(0.2)


async def _remove_containers(cri: CRIClient) -> None:
    for container in (await cri.runtime.ListContainers()).containers:
        await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=container.id,
                                            timeout=0))
        await cri.runtime.RemoveContainer(msg("RemoveContainerRequest",
                                              container_id=container.id))


@pytest.mark.parametrize("step", PULL_STEPS)
async def test_a_crash_in_pull_image_leaks_nothing(node: Node, registry: Registry,
                                                   step: str) -> None:
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("e2e/crash", "v1",
                                                   small_image(f"{step}\n"))
    ref = f"{registry.host}/e2e/crash:v1"
    before = _blobs(node.daemon)
    pull = msg("PullImageRequest", image=msg("ImageSpec", image=ref))
    await node.crash_in(step, lambda cri: cri.image.PullImage(pull))
    cri = node.daemon.client()
    try:
        listed = (await cri.image.ListImages()).images
        assert not [i for i in listed if ref in i.repo_tags]
        assert _blobs(node.daemon) == before, "blobs or snapshots of an image never recorded"
        image_id = (await cri.image.PullImage(pull)).image_ref
        after = _blobs(node.daemon)
        assert not [n for names in after for n in names if n.startswith(".tmp-")]
        await cri.image.RemoveImage(msg("RemoveImageRequest",
                                        image=msg("ImageSpec", image=image_id)))
        assert _blobs(node.daemon) == before
    finally:
        await cri.close()


@pytest.mark.parametrize("step", POD_STEPS)
async def test_a_crash_in_stop_or_remove_pod_leaks_nothing(node: Node, step: str) -> None:
    cri = node.daemon.client()
    try:
        container_id = await node.create(cri)
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=container_id))
    finally:
        await cri.close()
    call = "StopPodSandbox" if step.startswith("stop") else "RemovePodSandbox"
    await node.crash_in(step, lambda cri: getattr(cri.runtime, call)(
        msg(f"{call}Request", pod_sandbox_id=node.pod_id)))
    cri = node.daemon.client()
    try:
        pods = (await cri.runtime.ListPodSandbox()).items
        # Complete (stopped, kubelet removes it again) or gone: never READY without its VM.
        assert [p.state for p in pods if p.id == node.pod_id] in (
            [], [enum("SANDBOX_NOTREADY")])
        await _consistent(node, cri)
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                               pod_sandbox_id=node.pod_id))
        assert await _consistent(node, cri) == []
        assert backend_leftovers(node.daemon) == []
        assert _mounts_under(node.daemon.state / "runtimes" / "microvm" / "volumes") == [
            str(node.daemon.state / "runtimes" / "microvm" / "volumes")]
        node.pod_id = await cri.run_pod(POD)  # same name and attempt: the next case's pod
    finally:
        await cri.close()


async def test_qemu_killed_during_create_container_leaves_a_pod_to_remove(node: Node) -> None:
    """The VM dies under a CreateContainer (SIGKILL to QEMU while the guest makes it): the call
    fails or the container is listed exited, the pod is NOTREADY, RemovePodSandbox leaves
    nothing, and the same pod runs again."""
    cri = node.daemon.client()
    try:
        create = asyncio.ensure_future(node.create(cri))
        await asyncio.sleep(0.3)  # the guest is mounting the image and making the container
        assert not create.done()
        for pid in qemus_of(node.workdir):
            os.kill(pid, signal.SIGKILL)
        try:
            await create
        except grpc.aio.AioRpcError as exc:
            assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), exc
        for _ in range(100):  # the VM's end is seen by its QMP watcher
            pods = (await cri.runtime.ListPodSandbox()).items
            if [p.state for p in pods] == [enum("SANDBOX_NOTREADY")]:
                break
            await asyncio.sleep(0.1)
        assert [p.state for p in pods] == [enum("SANDBOX_NOTREADY")]
        for container in await _consistent(node, cri):
            assert container.state == enum("CONTAINER_EXITED"), container
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                               pod_sandbox_id=node.pod_id))
        assert await _consistent(node, cri) == []
        assert backend_leftovers(node.daemon) == []
        node.pod_id = await cri.run_pod(POD)
        container_id = await node.create(cri)
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=container_id))
        await _remove_containers(cri)
    finally:
        await cri.close()


# -- a template build cut short ----------------------------------------------------------------

TEMPLATE_STEPS = [
    "template.booting",  # the template's QEMU daemonized, its directory a .tmp
    "template.saved",  # memory and state written into the .tmp, not yet published
]


@pytest.mark.parametrize("step", TEMPLATE_STEPS)
async def test_a_crash_while_a_template_is_built_leaks_nothing(step: str) -> None:
    require_assets()
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, templates=True, accelerator="tcg"))
    templates = daemon.state / "runtimes" / "microvm" / "templates"
    daemon.start(env={ENV: step})
    cri = daemon.client()
    try:
        # The first pod boots; its shape's template is built behind it and the daemon dies
        # there, before or after the pod's own answer.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await cri.run_pod("first")
        assert daemon.process is not None
        assert daemon.process.wait(120) == -signal.SIGKILL
        assert f"failpoint {step} reached" in daemon.log()
        assert [p.name for p in templates.iterdir() if p.name.endswith(".tmp")]

        daemon.start()
        await cri.close()
        cri = daemon.client()
        # The build's QEMU and directory are gone; the pod, if it was recorded, was adopted.
        assert not [p.name for p in templates.iterdir() if p.name.endswith(".tmp")]
        pods = (await cri.runtime.ListPodSandbox()).items
        assert len(qemus_of(workdir)) == len(pods)
        for p in pods:
            await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                   pod_sandbox_id=p.id))
        assert qemus_of(workdir) == []
        assert list((daemon.state / "netns").iterdir()) == []  # the build's scratch netns too

        # Recovered, not just cleaned: the template is built again and a pod is cloned from it.
        second = await cri.run_pod("second")
        deadline = time.monotonic() + 180
        while not built_templates(daemon.state):
            assert time.monotonic() < deadline, "no template built after the restart"
            await asyncio.sleep(0.5)
        third = await cri.run_pod("third")
        ready = [line for line in daemon.log().splitlines() if f"pod vm ready pod={third} " in line]
        assert ready and "template=-" not in ready[0], ready
        for pod_id in (second, third):
            await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                   pod_sandbox_id=pod_id))
        assert qemus_of(workdir) == []
    finally:
        await cri.close()
        tear_down(daemon, workdir)


# -- the warm pool -----------------------------------------------------------------------------

POOL_STEPS = [
    "pool.warming",  # a pooled VM's QEMU restored, its warm-up not begun
    "pool.netns_handed_over",  # RunPodSandbox took it: the netns the pod's, the dirs not yet
]


@pytest.mark.parametrize("step", POOL_STEPS)
async def test_a_crash_while_a_pooled_vm_is_warmed_or_taken_leaks_nothing(step: str) -> None:
    require_assets()
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, warm_pool=1, accelerator="tcg"))
    state = daemon.state / "runtimes" / "microvm"
    daemon.start(env={ENV: step})
    cri = daemon.client()
    try:
        # The first pod boots; the pool fills behind it once its template is built. The daemon
        # dies warming that VM, or in the next RunPodSandbox, which takes it.
        await cri.run_pod("first")
        if step == "pool.netns_handed_over":
            await wait_pool_filled(cri)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await cri.run_pod("second")
        assert daemon.process is not None
        assert daemon.process.wait(240) == -signal.SIGKILL
        assert f"failpoint {step} reached" in daemon.log()

        daemon.start()
        await cri.close()
        cri = daemon.client()
        # No pooled VM of the dead daemon's is left, nor its netns or dirs; the pods listed
        # are the VMs running.
        assert not [p.name for p in state.iterdir() if p.name.startswith("pool-")]
        assert not [p.name for p in (state / "volumes").iterdir() if p.name.startswith("pool-")]
        assert not [p.name for p in (daemon.state / "netns").iterdir()
                    if p.name.startswith("pool-")]
        pods = (await cri.runtime.ListPodSandbox()).items
        assert len(qemus_of(workdir)) == len(pods)
        for p in pods:
            await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                   pod_sandbox_id=p.id))
        assert qemus_of(workdir) == []
        assert list((daemon.state / "netns").iterdir()) == []
        assert [p for p in backend_leftovers(daemon) if not p.startswith("templates/")] == []

        # Recovered: the pool fills again and a pod takes a warmed VM.
        await cri.run_pod("third")
        await wait_pool_filled(cri)
        fourth = await cri.run_pod("fourth")
        ready = [line for line in daemon.log().splitlines()
                 if f"pod vm ready pod={fourth} " in line]
        assert ready and "pooled=pool-" in ready[0], ready
        for p in (await cri.runtime.ListPodSandbox()).items:
            await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                   pod_sandbox_id=p.id))
    finally:
        await cri.close()
        tear_down(daemon, workdir)
