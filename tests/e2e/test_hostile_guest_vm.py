"""A hostile guest in a real micro-VM (issue 18): a pod whose guest, once told to, sends the
host garbage instead of agent answers, or stops answering altogether, while a neighbour pod
runs beside it in the same daemon.

The hostile guest is the real guest assets with one change: its PID 1 is
tests/e2e/hostile_init.py, which runs the real agent as its child and relays the
virtio-serial port to it until a container's env var carries `criserver-hostile=<mode>`. So
the pod boots, runs and execs as any other until then, through the real QEMU and channel.

What must hold: the CRI call in flight ends with a deliberate status (never UNKNOWN or
INTERNAL), the daemon stays up with bounded memory, the neighbour keeps working, the broken
pod is reported NOTREADY with its reason (garbage) or its calls time out (stall), and stopping
and removing it leaves no QEMU, netns or file behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from criserver.vm import assets
from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon
from tests.e2e.conftest import (
    handler_config,
    keep_logs,
    microvm_config,
    qemus_of,
    require_assets,
    short_workdir,
    tear_down,
)

pytestmark = pytest.mark.vm

HOSTILE_INIT = Path(__file__).with_name("hostile_init.py")
# A deliberate answer to a call the guest broke; UNKNOWN and INTERNAL would be unhandled paths.
DELIBERATE = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.DEADLINE_EXCEEDED}


RELAY = (b"/bin/cat /hostile_init.py > /newroot/run/hostile_init.py\n"
         b"exec /bin/switch_root /newroot /usr/bin/python3 /run/hostile_init.py")
PANIC = b"echo 'hostile-init: PID 1 exits'; exit 1"  # the kernel panics: PID 1 must not end


def hostile_assets(dest: Path, start: bytes = RELAY) -> Path:
    """The installed guest assets whose /init ends with `start` instead of starting the agent
    (RELAY: hostile_init.py as PID 1): the kernel and root disk linked, the initramfs extended
    by a second cpio archive (the kernel unpacks both, the later one's /init winning)."""
    real = assets.load()
    version = dest / "hostile"
    version.mkdir(parents=True)
    for name in (real.manifest["kernel"], real.manifest["root"]):
        (version / name).symlink_to(real.path / name)
    init = (Path(real.initramfs)).read_bytes()
    stage = dest / "stage"
    stage.mkdir()
    original_init = subprocess.run(
        ["cpio", "-i", "--to-stdout", "init"], input=init, capture_output=True, check=True).stdout
    last = b"exec /bin/switch_root /newroot /usr/bin/python3 -m vmagent"
    assert last in original_init, "the guest's /init no longer ends as this test expects"
    (stage / "init").write_bytes(original_init.replace(last, start))
    (stage / "init").chmod(0o755)
    shutil.copy(HOSTILE_INIT, stage / "hostile_init.py")
    extra = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage,
                           input=b"init\nhostile_init.py\n", capture_output=True, check=True).stdout
    initramfs = version / real.manifest["initramfs"]
    initramfs.write_bytes(init + extra)
    manifest = json.loads(json.dumps(real.manifest))
    manifest["files"][real.manifest["initramfs"]] = {
        "sha256": hashlib.sha256(initramfs.read_bytes()).hexdigest(),
        "size": initramfs.stat().st_size}
    (version / "manifest.json").write_text(json.dumps(manifest))
    (dest / "current").symlink_to("hostile")
    return dest


@dataclass
class Node:
    daemon: Daemon
    workdir: Path
    cri: CRIClient
    image: str
    neighbour: str = ""
    neighbour_container: str = ""

    def container(self, name: str, *env: str) -> object:
        return self.cri.container_config(
            name, image=self.image, command=["sleep", "3600"],
            envs=[msg("KeyValue", key=f"E{i}", value=v.encode()) for i, v in enumerate(env)])

    async def run(self, pod_name: str, handler: str, container: str) -> tuple[str, str]:
        pod_id = await self.cri.run_pod(pod_name, handler=handler)
        created = await self.cri.runtime.CreateContainer(msg(
            "CreateContainerRequest", pod_sandbox_id=pod_id, config=self.container(container),
            sandbox_config=self.cri.pod_config(pod_name)))
        await self.cri.runtime.StartContainer(msg(
            "StartContainerRequest", container_id=created.container_id))
        return pod_id, str(created.container_id)

    async def exec_echo(self, container_id: str, timeout: int = 30) -> None:
        reply = await self.cri.runtime.ExecSync(msg(
            "ExecSyncRequest", container_id=container_id, cmd=["echo", "alive"],
            timeout=timeout))
        assert reply.exit_code == 0 and reply.stdout == b"alive\n", reply

    async def neighbour_works(self) -> None:
        await self.exec_echo(self.neighbour_container)
        await self.cri.runtime.ListContainerStats(msg("ListContainerStatsRequest"))
        status = await self.cri.runtime.PodSandboxStatus(msg(
            "PodSandboxStatusRequest", pod_sandbox_id=self.neighbour))
        assert status.status.state == enum("SANDBOX_READY")

    def rss_mib(self) -> float:
        assert self.daemon.process is not None
        status = Path(f"/proc/{self.daemon.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert found is not None
        return int(found[1]) / 1024

    async def remove(self, pod_id: str) -> None:
        await self.cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
        await self.cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                    pod_sandbox_id=pod_id))
        assert len(qemus_of(self.workdir)) == 1, "only the neighbour's QEMU is left"
        for top in (self.daemon.state, self.daemon.root):
            assert not [p for p in top.rglob(f"*{pod_id[:12]}*")], f"files of {pod_id} left"
        assert not (self.daemon.state / "netns" / pod_id).exists()


@pytest.fixture(scope="module")
async def node(busybox_ref: str) -> AsyncIterator[Node]:
    require_assets()
    workdir = short_workdir()
    hostile = hostile_assets(workdir / "guest")
    panicking = hostile_assets(workdir / "panicking", PANIC)
    daemon = Daemon(workdir, config=microvm_config(workdir, templates=False, accelerator="tcg")
                    + handler_config("hostile", "microvm", assets_dir=str(hostile),
                                     templates=False, accelerator="tcg")
                    + handler_config("panicking", "microvm", assets_dir=str(panicking),
                                     templates=False, accelerator="tcg"))
    daemon.start()
    cri = daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest",
                                      image=msg("ImageSpec", image=busybox_ref)))
        node = Node(daemon, workdir, cri, busybox_ref)
        node.neighbour, node.neighbour_container = await node.run("neighbour", "", "ctr")
        yield node
    finally:
        await cri.close()
        tear_down(daemon, workdir, keep_workdir=True)
        keep_logs(daemon, workdir)
        shutil.rmtree(workdir, ignore_errors=True)


async def _turn_hostile(node: Node, pod_id: str, pod_name: str, mode: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.cri.runtime.CreateContainer(msg(
            "CreateContainerRequest", pod_sandbox_id=pod_id,
            config=node.container("evil", f"criserver-hostile={mode}"),
            sandbox_config=node.cri.pod_config(pod_name)), timeout=120)
    code: grpc.StatusCode = err.value.code()
    assert code in DELIBERATE, (code, err.value.details())
    return code


async def test_a_guest_sending_garbage_is_reported_broken_and_harms_nobody(node: Node) -> None:
    pod_id, ctr = await node.run("hostile-garbage", "hostile", "ok")
    await node.exec_echo(ctr)  # the relay is transparent until told otherwise
    rss_before = node.rss_mib()

    await _turn_hostile(node, pod_id, "hostile-garbage", "garbage")

    for _ in range(600):
        status = await node.cri.runtime.PodSandboxStatus(msg(
            "PodSandboxStatusRequest", pod_sandbox_id=pod_id, verbose=True))
        if status.status.state == enum("SANDBOX_NOTREADY"):
            break
        await asyncio.sleep(0.1)
    assert status.status.state == enum("SANDBOX_NOTREADY")
    info = json.loads(status.info["info"])
    assert info["reason"] == "AgentProtocolError", info
    container = await node.cri.runtime.ContainerStatus(msg("ContainerStatusRequest",
                                                           container_id=ctr))
    assert container.status.state == enum("CONTAINER_EXITED")
    assert container.status.reason == "AgentProtocolError", container.status

    await node.neighbour_works()
    assert node.daemon.process is not None and node.daemon.process.poll() is None
    assert node.rss_mib() - rss_before < 48, "32 MiB of garbage must not be kept"
    await node.remove(pod_id)


async def test_a_stalled_guest_times_out_alone_and_is_removed(node: Node) -> None:
    pod_id, ctr = await node.run("hostile-stall", "hostile", "ok")
    await node.exec_echo(ctr)

    async def neighbour_throughout() -> int:
        rounds = 0
        while not hostile.done():
            await node.neighbour_works()
            rounds += 1
        return rounds

    hostile = asyncio.ensure_future(_turn_hostile(node, pod_id, "hostile-stall", "stall"))
    assert await neighbour_throughout() > 0
    # DEADLINE_EXCEEDED, or UNAVAILABLE once the client gave up the silent connection
    hostile.result()

    with pytest.raises(grpc.aio.AioRpcError) as err:  # a wedged guest fails each call alone
        await node.exec_echo(ctr, timeout=2)
    assert err.value.code() in DELIBERATE
    # Its stats are left out of the lists, which wait for it once, not at every call.
    for _ in range(3):
        stats = await node.cri.runtime.ListContainerStats(msg("ListContainerStatsRequest"),
                                                          timeout=2)
        assert {s.attributes.id for s in stats.stats} == {node.neighbour_container}
    listed = await node.cri.runtime.ListContainers(msg("ListContainersRequest"))
    assert ctr in {c.id for c in listed.containers}
    await node.neighbour_works()
    await node.remove(pod_id)


async def test_a_guest_that_panics_at_boot_fails_its_start_at_once(node: Node) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.cri.run_pod("panicking", handler="panicking")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    details = err.value.details() or ""
    assert "the guest kernel panicked" in details
    # The console goes with the pod: its last lines are quoted, and its end kept in the log.
    assert "console ends: " in details and "Kernel panic" in details.split("console ends: ")[1]
    assert "hostile-init: PID 1 exits" in node.daemon.log().split("pod vm not ready")[-1]
    assert len(qemus_of(node.workdir)) == 1, "only the neighbour's QEMU is left"
    listed = await node.cri.runtime.ListPodSandbox(msg("ListPodSandboxRequest"))
    assert [p.metadata.name for p in listed.items] == ["neighbour"]
    await node.neighbour_works()
