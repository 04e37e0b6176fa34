"""Pod VMs restored from a template and warmed ahead of demand, for the next pods of a shape.

Under TCG a clone starts with an empty translation cache: its first agent call, its first
container's create and start and its first exec translate the guest code they run, ~1 s of CPU
on this host that a pod which has run a container once does not pay again. The pool pays it
before a pod asks, as Kata's VM cache does: each pooled VM is a clone whose agent has answered
and which has created, started, exec'd into and removed a throwaway container of no pod yet:
in the VM's IPC and UTS namespaces and with /dev/shm, as the pod's containers will be, but
with none of the pod's files (agent.proto `outside_pod`).

RunPodSandbox takes a pooled VM of its shape (`take`): the VM's netns, tap inside, becomes the
pod's, its volumes dir is renamed to the pod's, and the pod's state dir becomes a link to the
VM's, which its QEMU's command line names (`process._names` follows the link). What makes the
VM the pod's (MAC, hostname, clock, RNG, network, sysctls) comes after from SetupSandbox, as for
any clone. A pooled VM costs an idle pod's memory and CPU while it waits (under TCG ~0.2% of
a core, and ~85 MiB of PSS, 134 MiB while no pod shares its template's pages), and nothing
until a pod asks for a VM. It refills one VM at a time, a moment after each take, and its QEMU
runs at the lowest CPU priority until a pod takes it: a refill spends the CPU the node's pods
leave, never theirs.

What a daemon crash leaves (pooled VMs no pod links to, their netns and volumes dirs) goes at
the next start (`prune`); a pod that has taken one owns it through its link from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm import spec_policy
from criserver.backends.microvm.channel import AgentClient
from criserver.backends.microvm.podvm import PodVM
from criserver.backends.microvm.shares import PodVolumes
from criserver.errors import CriError, Unavailable
from criserver.failpoints import crash_point
from criserver.network import netns
from criserver.network.pod import PodNetwork
from criserver.runtime import oci_spec
from criserver.vm import process, tap
from criserver.vm.qemu import AgentTransport, TapNic, VMSpec
from criserver.vm.template import TEMPLATE_MAC, TemplateStore, template_key
from criserver.vm.vm import VM
from vmagent.api import agent_pb2 as pb
from vmagent.contract import RUN_DIR

log = logging.getLogger(__name__)

PREFIX = "pool-"  # pod ids are hex: no pod's state dir, netns or volumes dir is named so
REFILL_DELAY = 1.0  # s after a take: the pod that took one starts its containers first. At
# nice 19 the refill leaves it the CPU (crictl_ops, create + start: 2.4x and 2.5x of
# containerd's with this delay, 2.9-3.5x with 5 s), and a refill takes 0.8-1.5 s (critest's
# daemon log): pods ~2.5 s apart each find a warm VM.
WARM_UP_TIMEOUT = 120.0
POOLED_NICENESS = 19  # until taken; then the daemon's own
WARM_UP_BUSYBOX = "/.criserver-warm-up/busybox"  # the guest's, bound into the warm-up container

# `like` (a pod's spec) as VM `name` starts it: its own state dir, agent channel and NICs.
Respec = Callable[[str, VMSpec, tuple[TapNic, ...]], VMSpec]
AgentFor = Callable[[str, AgentTransport], AgentClient]


@dataclass(frozen=True)
class PooledVM:
    name: str  # of its state dir, netns and volumes dir until a pod takes it
    key: str  # the template key of its shape
    spec: VMSpec
    vm: VM
    image: str = ""  # the image snapshot its warm-up mounted ("": the guest's root)


class WarmPool:
    def __init__(self, size: int, state_root: Path, volumes_root: Path,
                 network: PodNetwork | None, templates: TemplateStore, respec: Respec,
                 agent_for: AgentFor, boot_timeout: float) -> None:
        self.size = size
        self._state_root = state_root
        self._volumes_root = volumes_root
        self._network = network
        self._templates = templates
        self._respec = respec
        self._agent_for = agent_for
        self._boot_timeout = boot_timeout
        self._ready: list[PooledVM] = []
        self._like: VMSpec | None = None  # the shape pooled: the last pod's
        self._image = ""  # the snapshot of the last container's image: the warm-up mounts it
        self._filler: asyncio.Task[None] | None = None

    @property
    def ready(self) -> int:
        return len(self._ready)

    def want(self, spec: VMSpec) -> None:
        """Pool VMs of `spec`'s shape from now on (a pod of it has started)."""
        key = template_key(spec)
        if self._like is None or template_key(self._like) != key:
            self._like = spec
            for entry in [e for e in self._ready if e.key != key]:
                self._ready.remove(entry)
                self._spawn_discard(entry)
        self._refill(delay=0.0)

    def use_image(self, snapshot: str) -> None:
        """A container of this snapshot's image was created: the next warm-ups mount it."""
        self._image = snapshot

    def take(self, spec: VMSpec) -> PooledVM | None:
        """A warmed VM of `spec`'s shape, now the caller's (see `hand_over`), if one is ready."""
        key = template_key(spec)
        for entry in [e for e in self._ready if e.key == key]:
            self._ready.remove(entry)
            if entry.vm.exited:  # its QEMU died while it waited: never a pod's
                log.warning("pooled vm gone before it was taken name=%s", entry.name)
                self._spawn_discard(entry)
                continue
            log.info("pooled vm taken name=%s left=%d", entry.name, len(self._ready))
            self._refill(delay=REFILL_DELAY)
            return entry
        return None

    async def hand_over(self, entry: PooledVM, pod_id: str, state_link: Path,
                        volumes_dir: Path) -> None:
        """Make `entry`'s netns, volumes dir and state dir the pod's. The link comes last: until
        it exists, a crash leaves the VM to `prune`, and the renamed parts to the pod's own
        clean-up (both go by the pod's names from then on)."""
        try:
            if entry.vm.pid is not None:
                await asyncio.to_thread(process.set_niceness, entry.vm.pid,
                                        os.getpriority(os.PRIO_PROCESS, 0))
            if self._network is not None:
                await self._network.hand_over(entry.name, pod_id)
            crash_point("pool.netns_handed_over")  # the netns the pod's, the rest the VM's
            await asyncio.to_thread(os.rename, self._volumes_root / entry.name, volumes_dir)
            await asyncio.to_thread(state_link.symlink_to, entry.name)
        except BaseException:
            await self._discard(entry)
            raise

    async def close(self) -> None:
        """Stop refilling and kill the pooled VMs (a later daemon warms its own)."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        entries, self._ready = self._ready, []
        for entry in entries:
            await self._discard(entry)

    def prune(self) -> None:
        """Kill and remove the pooled VMs a dead daemon left that no pod's state dir links to,
        with their netns and volumes dirs. Blocking: call from a thread at start."""
        root = self._state_root
        taken = {os.readlink(p) for p in _entries(root) if p.is_symlink()}
        for entry in _entries(root):
            if entry.name.startswith(PREFIX) and not entry.is_symlink() \
                    and entry.name not in taken:
                if process.kill_all(entry / "qemu.pid"):
                    log.warning("a pooled VM's QEMU survived SIGKILL dir=%s", entry)
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                log.info("pooled vm of an earlier daemon removed name=%s", entry.name)
        for entry in _entries(self._volumes_root):
            if entry.name.startswith(PREFIX):
                with contextlib.suppress(OSError):
                    entry.rmdir()  # a pooled VM's volumes dir never holds a bind

    async def prune_netns(self) -> None:
        """The netns of pooled VMs a dead daemon left (a taken VM's is named after its pod)."""
        if self._network is not None:
            directory = self._network.netns_dir
            for path in await asyncio.to_thread(lambda: list(directory.glob(f"{PREFIX}*"))):
                await netns.remove(path)

    # -- filling ---------------------------------------------------------------------------

    def _refill(self, delay: float) -> None:
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill(delay), name="warm pool refill")

    async def _fill(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._templates.wait_built()  # the first pod of a shape has its template built
        while self._like is not None and len(self._ready) < self.size:
            like = self._like
            t0 = time.monotonic()
            try:
                entry = await self._make(like)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # tried again when the next pod starts
                message = exc.message if isinstance(exc, CriError) else repr(exc)
                log.warning("warm pool: a pooled VM failed to start: %s", message)
                return
            if self._like is not like:  # the shape changed meanwhile
                await self._discard(entry)
                continue
            self._ready.append(entry)
            log.info("pooled vm ready name=%s seconds=%.2f ready=%d image=%s", entry.name,
                     time.monotonic() - t0, len(self._ready), entry.image or "-")

    async def _make(self, like: VMSpec) -> PooledVM:
        name = PREFIX + secrets.token_hex(4)
        volumes = PodVolumes(self._volumes_root / name)
        await asyncio.to_thread(volumes.create)
        entry: PooledVM | None = None
        agent: AgentClient | None = None
        try:
            nics: tuple[TapNic, ...] = ()
            if self._network is not None and like.nics:
                path = await self._network.prepare(name)
                await tap.create_tap(path)
                nics = (TapNic(await tap.open_tap_fd(path), TEMPLATE_MAC),)
            try:
                spec = self._respec(name, like, nics)
                template = await asyncio.to_thread(self._templates.ready, spec)
                if template is None:
                    raise Unavailable(f"no template of shape {template_key(spec)} yet")
                spec = template.clone_spec(spec)
                vm = VM(spec)
                await vm.start()
            finally:
                for nic in nics:
                    os.close(nic.fd)  # QEMU holds its own copy
            image = self._image
            entry = PooledVM(name, template_key(spec), spec, vm, image)
            if vm.pid is not None:
                await asyncio.to_thread(process.set_niceness, vm.pid, POOLED_NICENESS)
            await vm.restore_state(template.state)
            crash_point("pool.warming")  # its QEMU runs, its netns and dirs named after it
            if spec.transport is None:
                raise Unavailable(f"pooled vm {name}: its spec has no agent channel")
            agent = self._agent_for(name, spec.transport)
            deadline = time.monotonic() + self._boot_timeout
            await PodVM(name, vm, agent).wait_ready(deadline)
            try:
                async with asyncio.timeout(WARM_UP_TIMEOUT):
                    await warm_up(agent, name, image)
            except CriError:
                if image and self._image == image:
                    self._image = ""  # removed meanwhile, maybe: the next try goes without
                raise
            return entry
        except BaseException:
            if entry is not None:
                await self._discard(entry)
            else:
                await self._remove_files(name)
            raise
        finally:
            if agent is not None:
                agent.close()  # the pod that takes the VM opens its own connection

    def _spawn_discard(self, entry: PooledVM) -> None:
        task = asyncio.create_task(self._discard(entry), name=f"discard {entry.name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _discard(self, entry: PooledVM) -> None:
        with contextlib.suppress(CriError):
            await entry.vm.kill()
        await self._remove_files(entry.name)

    async def _remove_files(self, name: str) -> None:
        try:
            if self._network is not None:
                await netns.remove(self._network.netns_path(name))
            await PodVolumes(self._volumes_root / name).remove_all()
            await asyncio.to_thread(shutil.rmtree, self._state_root / name, True)
        except CriError as exc:
            log.warning("warm pool: removing %s failed: %s", name, exc.message)


async def warm_up(agent: AgentClient, name: str, image: str = "") -> None:
    """Create, start, exec into and delete a container once, so the guest code of a pod's
    first container and its first exec is translated. Its rootfs is `image`'s snapshot (left
    mounted in the guest for the pod's first container, as the agent keeps an image mounted
    once used), or the guest's own root; what it runs is the guest's busybox, bound in: never
    anything of an image's.

    One exec: measured (bench/translation.py --warm-pool), it cuts the blocks a pod's first
    exec translates from ~2,300 to ~800; three cut them to ~700 but slowed the pod's start.
    No kill or wait: the forced delete ends the container (docs/benchmarks.md, "A pooled
    pod's first exec")."""
    cid = f"warm-up-{name}"
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="warm-up"),
        command=[WARM_UP_BUSYBOX, "sleep", "600"],
        linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
            namespace_options=cri.NamespaceOption(pid=cri.CONTAINER))))
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="criserver", uid=name),
        hostname=name)
    generated = await oci_spec.generate_async(
        config, pod_config, None, oci_spec.PodNamespaces(ipc="", uts=""), lambda m: "",
        policy=spec_policy.POLICY, container_id=cid, sandbox_id=name, sandbox_dir=RUN_DIR)
    generated.spec["mounts"].append({"destination": WARM_UP_BUSYBOX, "type": "bind",
                                     "source": "/usr/bin/busybox", "options": ["bind", "ro"]})
    lower = pb.Mount(type="erofs", source=f"image:{image}") if image else pb.Mount(source="/")
    await agent.call("CreateContainer", pb.CreateContainerRequest(
        request_id=f"create-{cid}", container_id=cid, sandbox_id=name,
        oci_spec_json=generated.to_json(), outside_pod=True,
        rootfs=pb.Rootfs(lowers=[lower])), timeout=WARM_UP_TIMEOUT)
    try:
        await agent.call("StartContainer", pb.StartContainerRequest(
            request_id=f"start-{cid}", container_id=cid))
        reply = await agent.exec_sync(pb.ExecSyncRequest(
            container_id=cid, process=pb.Process(argv=[WARM_UP_BUSYBOX, "true"]),
            timeout_seconds=60))
        if reply.exit_code != 0:
            raise Unavailable(f"warm-up exec exited {reply.exit_code}: {reply.stderr[:200]!r}")
    finally:  # force: kills what runs
        await agent.call("DeleteContainer", pb.DeleteContainerRequest(
            container_id=cid, force=True))


def remove_pod_state_dir(path: Path) -> None:
    """A pod's state dir, or the pooled VM's it links to: the link first, so a crash leaves
    an unlinked pool dir, which `prune` removes. Blocking."""
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        path.unlink()
        shutil.rmtree(target, ignore_errors=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _entries(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except FileNotFoundError:
        return []
