"""The micro-VM backend: every pod a QEMU micro-VM, its containers run by the guest agent.

A pod is the composition of separate resources (sibling modules): its network (`network`: netns,
CNI, tap), its file shares (`shares`), the VM process and its QMP session (`vm`, `qemu`) and the
agent channel (`channel`); containers add their output and exit (`container_io`). This class
only orders them and undoes them; each resource knows how to make and unmake itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criserver import files
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm import guest_metrics, spec_policy, streams
from criserver.backends.microvm.channel import AgentAddress, AgentClient
from criserver.backends.microvm.container_io import ContainerIO
from criserver.backends.microvm.guest import GuestBoot, TemplateBoot, pod_guest_spec
from criserver.backends.microvm.guest_deletes import GuestDeletes
from criserver.backends.microvm.podvm import PodVM
from criserver.backends.microvm.pool import PREFIX as POOL_PREFIX
from criserver.backends.microvm.pool import PooledVM, WarmPool, remove_pod_state_dir
from criserver.backends.microvm.shares import (
    PodVolumes,
    pod_shares,
    prepare_volumes_root,
    with_submounts,
)
from criserver.config import build_options, option
from criserver.errors import (
    CriError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from criserver.failpoints import crash_point
from criserver.flight import SingleFlight
from criserver.network import netns
from criserver.network.cni import PortMapping
from criserver.network.pod import Attachment, PodNetwork, daemon_network
from criserver.runtime import oci_spec, pod_files
from criserver.runtime.backend import (
    BackendContext,
    BackendFeatures,
    BackendStatus,
    BaseBackend,
    ContainerCreated,
    ExecResult,
    SandboxStarted,
)
from criserver.runtime.metric_sample import PodSample
from criserver.runtime.streaming.interface import ByteSink, ByteSource, ResizeSource
from criserver.runtime.undo import UndoStack
from criserver.store.records import ContainerRecord, ContainerState, PodRecord, PodState
from criserver.trace import span
from criserver.vm import assets, tap
from criserver.vm.host import shared_host
from criserver.vm.qemu import (
    AgentTransport,
    Machine,
    SerialTransport,
    TapNic,
    VMLocation,
    VMSpec,
    VsockTransport,
)
from criserver.vm.template import TEMPLATE_MAC, Template, TemplateStore
from criserver.vm.vm import VM
from vmagent.api import agent_pb2 as pb
from vmagent.contract import AGENT_PORT_NAME, IMAGE_VOLUMES_DIR, RUN_DIR
from vmagent.ocispec import GUEST_DEVICES_ANNOTATION

log = logging.getLogger(__name__)
MIB = 1024 * 1024
MODULE_GROUPS = ("overlay", "9p", "loop")  # containers: image mounts, volumes, overlays
MAX_EXEC_OUTPUT = 16 * 1024 * 1024
# The pod's reason when its agent broke the protocol (channel.AgentProtocolError).
AGENT_BROKE_REASON = "AgentProtocolError"
CREATE_TIMEOUT = 120.0  # the first container of a pod mounts its shares and image
CONSOLE_TAIL_LOGGED = 4096  # bytes of a failed guest's console kept in the daemon log
CONSOLE_TAIL_QUOTED = 3  # of them, the last lines an error quotes
CONSOLE_FAILURE = re.compile(r"Kernel panic|\bBUG:|\bOops\b| ERROR | CRITICAL ")
_TEMPLATE_NETNS = "template-"  # pod ids are hex: no pod's netns is named like this
PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp", cri.SCTP: "sctp"}
PID_MODES = {cri.POD: pb.CreateContainerRequest.PID_POD,
             cri.CONTAINER: pb.CreateContainerRequest.PID_CONTAINER}


@dataclass(frozen=True)
class GuestNetwork:
    """A pod's network as its guest gets it: the CNI attachment in the pod's netns and the
    interface the agent configures on the NIC the tap feeds."""

    attachment: Attachment
    guest: tap.GuestInterface


@dataclass(frozen=True)
class MicroVMOptions:
    """`[runtimes.<handler>.options]` of a microvm handler; `criserver config default` prints
    each with its help text."""

    assets_dir: str = option(str(assets.DEFAULT_ASSETS_DIR),
                             "Guest kernel, initramfs and root filesystem (built by make guest)")
    machine: str = option("microvm", "QEMU machine: microvm, or q35 (PCI, ~0.1 s slower boot)")
    accelerator: str = option("auto", "auto (KVM when a probe boot proves it works, else TCG), "
                                      "kvm or tcg", choices=("auto", "kvm", "tcg"))
    qemu_binary: str = option("qemu-system-x86_64", "QEMU executable, a name on PATH or a path")
    default_memory_mib: int = option(256, "Guest memory of a pod without a memory limit, MiB",
                                     min=1)
    memory_overhead_mib: int = option(64, "Guest memory added to every pod's limit for the "
                                          "guest kernel and agent, MiB", min=0)
    default_vcpus: int = option(1, "vCPUs of a pod without a CPU limit", min=1)
    boot_timeout: float = option(60.0, "Seconds a pod's guest may take to answer", min=0)
    agent_call_timeout: float = option(10.0, "Seconds an agent call without a deadline of its "
                                             "own may wait for the guest's answer (raise it on "
                                             "a host whose emulated guests run saturated)",
                                       min=0.1)
    stop_grace: float = option(10.0, "Seconds a stopping pod's guest gets to power off, and a "
                                     "killed container to exit", min=0)
    network: bool = option(True, "Give pods networking (CNI); false: pods without network, "
                                 "e.g. on hosts without CNI")
    transport: str = option("auto", "Agent channel: vsock, serial (virtio-serial), or auto "
                                    "(vsock where the host has /dev/vhost-vsock)")
    # Host memory per pod. A booted idle guest fills ~76 MiB of translation cache and a cache
    # of 48 slowed its boot ~10%; a clone of a template fills ~53 MiB starting a container:
    # 56 measured no slower than 64.
    tcg_tb_size_mib: int = option(56, "TCG's translation cache per pod, MiB (0: QEMU's "
                                      "default, which grows to 1 GiB)", min=0)
    free_page_reporting: bool = option(True, "The guest hands the pages it frees back to the "
                                             "host (virtio-balloon free page reporting)")
    ksm: bool = option(False, "Turn on the host's kernel samepage merging at start: shares "
                              "identical pages across pods' VMs (host-wide)")
    templates: bool = option(True, "Start pods by restoring a saved, booted guest of the same "
                                   "shape (~0.3 s instead of a boot, guest pages shared); the "
                                   "first pod of a shape boots and its template is built in "
                                   "the background")
    templates_dir: str = option("", "Where templates (guest RAM) are kept; empty: "
                                    "<daemon state>/templates. Keep it on a tmpfs")
    max_templates: int = option(4, "Most templates kept (one per VM shape)", min=0)
    warm_pool: int = option(1, "Pod VMs kept restored from a template and warmed (a container "
                               "run in each once) ahead of demand, for pods of the last shape "
                               "started: such a pod skips most of the guest's first-run "
                               "cost. None until the first pod; each costs an idle pod's "
                               "memory and CPU, and warms at the lowest CPU priority. 0: no "
                               "pool. Without templates there is none",
                       min=0)
    guest_oci_runtime: str = option("auto", "The OCI runtime that runs containers in the guest: "
                                            "auto (crun when the guest image has it, else "
                                            "runc), crun or runc",
                                    choices=("auto", "crun", "runc"))


class MicroVMBackend(BaseBackend):
    name = "microvm"
    # What Status reports for this backend's handlers. Turn one on with its implementation.
    features = BackendFeatures(
        recursive_read_only_mounts=True,
        user_namespaces=True,
        streaming=True,
    )

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None:
        super().__init__(options, context)
        self.settings: MicroVMOptions = build_options(
            MicroVMOptions, options, f"runtimes.{context.handler}.options"
        )
        if self.settings.transport not in ("auto", "vsock", "serial"):
            raise InvalidArgument(f"runtimes.{context.handler}.options.transport: "
                                  f"{self.settings.transport!r} is not auto, vsock or serial")
        # The default pool goes quietly with templates = false; one asked for is refused.
        if "warm_pool" in options and self.settings.warm_pool > 0 and not self.settings.templates:
            raise InvalidArgument(f"runtimes.{context.handler}.options.warm_pool: the pool's "
                                  "VMs are clones of templates; it needs templates = true")
        if self.settings.machine not in {m.value for m in Machine}:
            raise InvalidArgument(f"runtimes.{context.handler}.options.machine: "
                                  f"{self.settings.machine!r} is not microvm or q35")
        self.network = context.shared.get(PodNetwork, lambda: daemon_network(context.config))
        settings = self.settings
        daemon_state = Path(context.config.daemon.state)
        self.host = shared_host(context.shared, daemon_state, qemu_binary=settings.qemu_binary,
                                accelerator=settings.accelerator,
                                assets_dir=Path(settings.assets_dir), enable_ksm=settings.ksm)
        self._pods: dict[str, PodVM] = {}
        # Pods this daemon stopped completely (VM gone, network torn down), until removed.
        self._stopped: set[str] = set()
        self._io: dict[str, ContainerIO] = {}
        self._stats_flight: SingleFlight[pb.StatsResponse] = SingleFlight()
        self._reports: set[asyncio.Task[None]] = set()  # pods reported broken (_agent_broke)
        self._guest_deletes = GuestDeletes(lambda pod_id: self._pod_state_dir(pod_id) / "deleting",
                                           self._delete_in_guest)
        self.templates: TemplateStore | None = None
        if self.settings.templates:
            self.templates = TemplateStore(
                Path(self.settings.templates_dir or context.state / "templates"),
                TemplateBoot(), self._scratch_nics, boot_timeout=self.settings.boot_timeout,
                max_templates=self.settings.max_templates)
        self.pool: WarmPool | None = None
        if self.templates is not None and self.settings.warm_pool > 0:
            self.pool = WarmPool(
                self.settings.warm_pool, context.state, self._volumes_root(),
                self.network if self.settings.network else None, self.templates,
                self._pool_spec, self._pool_agent, self.settings.boot_timeout)

    # -- daemon life -----------------------------------------------------------------------

    async def start(self, pods: list[PodRecord], containers: list[ContainerRecord]) -> None:
        await self.host.start()
        await asyncio.to_thread(prepare_volumes_root, self._volumes_root())
        if self.templates is not None:
            await asyncio.to_thread(self.templates.prune)
            # The scratch netns of a build a crash cut short (see _scratch_nics).
            for path in await asyncio.to_thread(
                    lambda: list(self.network.netns_dir.glob(f"{_TEMPLATE_NETNS}*"))):
                await netns.remove(path)
        if self.pool is not None:
            await asyncio.to_thread(self.pool.prune)
            await self.pool.prune_netns()
        for pod in pods:
            if pod.state == PodState.READY:
                await self._adopt(pod, [c for c in containers if c.pod_id == pod.id])

    def _location(self, pod_id: str) -> VMLocation:
        """Where the pod's QEMU is found: no assets needed to adopt or kill it."""
        return VMLocation(pod_id, self._pod_state_dir(pod_id), Machine(self.settings.machine))

    async def _adopt(self, pod: PodRecord, containers: list[ContainerRecord]) -> None:
        try:
            vm = await VM.adopt(self._location(pod.id))
        except CriError as exc:
            log.warning("pod vm gone at daemon start pod=%s error=%s", pod.id, exc.message)
            await self.context.events.sandbox_exited(
                pod.id, "VMExited", "the VM was not running when the daemon restarted")
            return
        handle = PodVM(pod.id, vm, self.agent_client(pod))
        self._pods[pod.id] = handle
        handle.watch(self._vm_ended)
        try:
            await handle.agent.check()
        except CriError as exc:
            log.warning("agent not answering after adopt pod=%s error=%s", pod.id, exc.message)
        await self._guest_deletes.resume(pod.id)
        for container in containers:
            if container.state == ContainerState.CREATED:
                await self._settle_start(pod, handle, container)
            elif container.state == ContainerState.RUNNING:
                self._follow(pod, container)

    async def _settle_start(self, pod: PodRecord, handle: PodVM,
                            container: ContainerRecord) -> None:
        """A CREATED container the guest has started: the daemon died in StartContainer after
        the agent's answer. The guest is the truth: record it RUNNING and follow it (its exit,
        if it has ended, is reported as any other), rather than list it CREATED while it runs."""
        try:
            state = await handle.agent.call("GetContainerState", pb.ContainerRequest(
                container_id=container.id))
        except CriError as exc:
            log.warning("container state unknown after adopt container=%s error=%s",
                        container.id, exc.message)
            return
        if state.status not in (pb.ContainerState.RUNNING, pb.ContainerState.STOPPED):
            return
        log.warning("container started by a daemon that died before recording it, running "
                    "container=%s pod=%s", container.id, pod.id)
        await self.context.events.container_started(
            container.id, int(state.started_at_unix_nanos) or time.time_ns())
        self._follow(pod, container)

    async def close(self) -> None:
        await self._guest_deletes.close()
        if self.pool is not None:
            await self.pool.close()
        await self.host.close()
        if self.templates is not None:
            await self.templates.close()
        for io in list(self._io.values()):
            await io.close()
        self._io.clear()
        for handle in list(self._pods.values()):
            await handle.close()
        self._pods.clear()

    async def status(self) -> BackendStatus:
        info: dict[str, Any] = {
            "backend": self.name,
            "machine": self.settings.machine,
            **await self.host.status(),
            "tcgTbSizeMib": self.settings.tcg_tb_size_mib,
            "templates": self.settings.templates,
            "pods": len(self._pods),
        }
        if self.pool is not None:
            info["warmPool"] = {"size": self.pool.size, "ready": self.pool.ready}
        ready = self.host.ready
        if self.settings.network:
            network = await self.network.status()
            net_ready, net_reason, net_message = network.ready, network.reason, network.message
        else:
            net_ready, net_reason, net_message = True, "", ""
        return BackendStatus(
            runtime_ready=ready,
            runtime_reason="" if ready else "GuestAssetsMissing",
            runtime_message="" if ready else self.host.assets_error,
            network_ready=net_ready,
            network_reason=net_reason,
            network_message=net_message,
            info=info,
        )

    async def set_pod_cidr(self, cidr: str) -> None:
        await self.network.set_pod_cidr(cidr)

    # -- pod resources ---------------------------------------------------------------------

    def _pod_state_dir(self, pod_id: str) -> Path:
        # Short on purpose: the QMP and agent sockets in it must fit AF_UNIX's 107 bytes.
        return self.context.state / pod_id[:16]

    def _pod_root_dir(self, pod_id: str) -> Path:
        return self.context.root / "pods" / pod_id

    def _volumes(self, pod_id: str) -> PodVolumes:
        # Outside the pod's state dir, which is deleted recursively: never delete through a
        # bind mount of host data.
        return PodVolumes(self._volumes_root() / pod_id[:16])

    def _volumes_root(self) -> Path:
        return self.context.state / "volumes"

    def _images_dir(self) -> Path:
        """What the guest mounts its images from: the image service's snapshots, or (a
        daemon without images, in tests) an empty directory, since the guest expects the share."""
        if self.context.images is not None:
            return self.context.images.snapshots_dir
        empty = self.context.state / "no-images"
        empty.mkdir(parents=True, exist_ok=True)
        return empty

    def _spec(self, pod: PodRecord, nics: tuple[TapNic, ...] = ()) -> VMSpec:
        memory, vcpus = self._size(pod.config)
        return self._vm_spec(pod.id, memory, vcpus, self.agent_transport(pod), nics)

    def _pool_spec(self, name: str, like: VMSpec, nics: tuple[TapNic, ...]) -> VMSpec:
        """A pooled VM's spec: `like`'s shape, with its own state dir, channel and NICs."""
        return self._vm_spec(name, like.memory_mib, like.vcpus,
                             self._pool_transport(name, like), nics)

    def _pool_transport(self, name: str, like: VMSpec) -> AgentTransport:
        """A pooled VM's agent channel: of `like`'s kind, its own (a CID from its name's hex)."""
        if isinstance(like.transport, VsockTransport):
            return VsockTransport(_guest_cid(name.removeprefix(POOL_PREFIX)))
        return SerialTransport(self._pod_state_dir(name) / "agent.sock", AGENT_PORT_NAME)

    def _pool_agent(self, name: str, transport: AgentTransport) -> AgentClient:
        return AgentClient(name, AgentAddress.of(transport),
                           call_timeout=self.settings.agent_call_timeout)

    def _vm_spec(self, name: str, memory: int, vcpus: int, transport: AgentTransport,
                 nics: tuple[TapNic, ...]) -> VMSpec:
        """The spec of VM `name` (a pod's id, or a pooled VM's name)."""
        host = self.host
        if host.assets is None:
            raise FailedPrecondition(host.assets_error)
        chosen = host.accelerator_now
        accel = chosen.name if chosen else "tcg"
        return pod_guest_spec(
            name,
            self._pod_state_dir(name),
            host.assets,
            transport,
            GuestBoot(tsc_khz=host.tsc_khz, module_groups=MODULE_GROUPS,
                      settings=self._agent_settings(accel)),
            machine=Machine(self.settings.machine),
            accel=accel,
            memory_mib=memory,
            vcpus=vcpus,
            nics=nics,
            shares=pod_shares(self._images_dir(), self._volumes(name).directory),
            qemu_binary=self.settings.qemu_binary,
            tcg_tb_size_mib=self.settings.tcg_tb_size_mib,
            free_page_reporting=self.settings.free_page_reporting,
        )

    def _agent_settings(self, accel: str) -> dict[str, str]:
        """The agent settings this handler's options and accelerator imply (only those not
        the default)."""
        settings = {}
        runtime = self.settings.guest_oci_runtime
        if runtime != "auto":
            settings["oci_runtime"] = runtime
        if accel == "tcg":
            # Emulated code is translated per virtual address: fixed addresses let every crun
            # call reuse what the first one translated (guest/vmexec.c fixed-addresses).
            settings["runtime_fixed_addresses"] = "1"
        return settings

    def _size(self, config: cri.PodSandboxConfig) -> tuple[int, int]:
        """Guest memory (MiB) and vCPUs: the pod's limits, or the defaults, plus overhead."""
        resources = config.linux.resources
        memory = (math.ceil(resources.memory_limit_in_bytes / MIB)
                  if resources.memory_limit_in_bytes > 0 else self.settings.default_memory_mib)
        vcpus = self.settings.default_vcpus
        if resources.cpu_quota > 0 and resources.cpu_period > 0:
            vcpus = math.ceil(resources.cpu_quota / resources.cpu_period)
        return memory + self.settings.memory_overhead_mib, max(1, min(vcpus, os.cpu_count() or 1))

    def agent_transport(self, pod: PodRecord) -> AgentTransport:
        """The pod's agent channel: what it was started with, or the configured choice."""
        cid = pod.backend.get("vsockCid")
        if cid is None and not pod.backend and self._use_vsock():
            cid = _guest_cid(pod.id)
        if cid is not None:
            return VsockTransport(int(cid))
        return SerialTransport(self._pod_state_dir(pod.id) / "agent.sock", AGENT_PORT_NAME)

    def _use_vsock(self) -> bool:
        if self.settings.transport == "auto":
            return os.path.exists("/dev/vhost-vsock")
        return self.settings.transport == "vsock"

    def agent_client(self, pod: PodRecord, transport: AgentTransport | None = None) -> AgentClient:
        return AgentClient(pod.id, AgentAddress.of(transport or self.agent_transport(pod)),
                           call_timeout=self.settings.agent_call_timeout,
                           on_violation=lambda reason: self._agent_broke(pod.id, reason))

    def _agent_broke(self, pod_id: str, reason: str) -> None:
        """The pod's agent broke the protocol (its answers are untrusted: the guest is broken or
        hostile), and its client gave up on it: the pod is reported NOTREADY with the reason,
        its containers exited, as when the VM dies; kubelet then stops and replaces it."""
        handle = self._pods.get(pod_id)
        if handle is None or handle.stopping:
            return  # still starting (the start fails and undoes itself), or being stopped
        report = asyncio.get_running_loop().create_task(self.context.events.sandbox_exited(
            pod_id, AGENT_BROKE_REASON, f"the guest agent broke the protocol: {reason}"),
            name=f"agent-broke-{pod_id[:12]}")
        self._reports.add(report)
        report.add_done_callback(self._reports.discard)

    def _live(self, pod: PodRecord) -> PodVM:
        handle = self._pods.get(pod.id)
        if handle is None:
            raise FailedPrecondition(f"pod {pod.id}: its VM is not running")
        return handle

    # -- sandboxes -------------------------------------------------------------------------

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        # hostPID/hostIPC are refused per container, as before; the network is the pod's.
        spec_policy.POLICY.check_namespaces(
            pod.config.linux.security_context.namespace_options, kinds=("network",))
        await self.host.accelerator()
        started = time.monotonic()
        # Fails early without assets; the NIC stands for the pod's (a template key counts NICs).
        shape = self._spec(pod, (TapNic(-1, TEMPLATE_MAC),) if self.settings.network else ())
        pooled = self.pool.take(shape) if self.pool is not None else None
        if pooled is not None:
            spec, vm = await self._take_pooled(pod, pooled, undo)
            template = None
        else:
            spec, vm, template = await self._start_vm(pod, undo)
        crash_point("run_sandbox.vm_started")
        handle = PodVM(pod.id, vm, self.agent_client(pod, spec.transport))
        undo.push("close agent", _sync(handle.agent.close))
        connecting = asyncio.create_task(self._connect_network(pod))
        try:
            with span("wait_ready"):
                check = await handle.wait_ready(time.monotonic() + self.settings.boot_timeout)
        except BaseException as exc:
            # Stop CNI midway: the network undo above removes whatever it made.
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            if isinstance(exc, CriError):
                # The console goes with the pod's state dir: its end is kept in the log and
                # the error, to tell a guest that hung at boot from one that panicked.
                console = await asyncio.to_thread(vm.log_tail, 0, CONSOLE_TAIL_LOGGED)
                log.warning("pod vm not ready pod=%s error=%s console tail:\n%s",
                            pod.id, exc.message, console)
                raise type(exc)(f"pod {pod.id}: guest agent not ready: {exc.message}; "
                                f"console ends: {_last_lines(console)}") from exc
            raise
        with span("cni_rest"):  # CNI ran during wait_ready: what it took beyond it
            network = await connecting
        crash_point("run_sandbox.network")
        # The host's resolv.conf may be read for it: off the event loop.
        setup = await asyncio.to_thread(_setup_request, pod, network, spec.nics)
        await handle.agent.setup_sandbox(setup)  # step agent.SetupSandbox
        crash_point("run_sandbox.guest_set_up")
        boot_ms = (time.monotonic() - started) * 1000
        self._pods[pod.id] = handle
        undo.push("forget vm", _sync(lambda: self._pods.pop(pod.id, None)))
        handle.watch(self._vm_ended)
        log.info("pod vm ready pod=%s pid=%s boot_ms=%.0f accel=%s template=%s pooled=%s "
                 "ips=%s", pod.id, vm.pid, boot_ms, spec.accel,
                 template.directory.name if template else "-", pooled.name if pooled else "-",
                 network.attachment.ips if network else [])
        if template is None and pooled is None and self.templates is not None:
            self.templates.ensure(spec)
        if self.pool is not None:
            self.pool.want(spec)
        return SandboxStarted(ips=tuple(network.attachment.ips) if network else (), backend={
            "qemuPid": vm.pid,
            "stateDir": str(spec.state_dir),
            "accelerator": spec.accel,
            "machine": spec.machine.value,
            "memoryMiB": spec.memory_mib,
            "vcpus": spec.vcpus,
            "bootTimeMs": round(boot_ms),
            "template": template.directory.name if template else "",
            "warmPoolVM": pooled.name if pooled else "",
            "guestKernel": check.kernel_release,
            "guestAssets": self.host.assets.version if self.host.assets else "",
            "consoleLog": str(spec.log_file),
            "netns": str(network.attachment.netns) if network else "",
            "agentTransport": "vsock" if isinstance(spec.transport, VsockTransport)
            else "virtio-serial",
            **({"vsockCid": spec.transport.guest_cid}
               if isinstance(spec.transport, VsockTransport) else {}),
        })

    async def _start_vm(self, pod: PodRecord,
                        undo: UndoStack) -> tuple[VMSpec, VM, Template | None]:
        """The pod's own VM, restored from its shape's template or (none yet) booted."""
        volumes = self._volumes(pod.id)
        with span("volumes"):
            await asyncio.to_thread(volumes.create)
        undo.push("remove volumes dir", volumes.remove_all)
        # The VM starts on an unconnected tap; CNI runs while the guest boots (it takes ~0.4 s
        # of the ~5 s). The guest device gets a MAC of ours now and the CNI one from the agent.
        nics: tuple[TapNic, ...] = ()
        if self.settings.network:
            with span("netns_tap"):
                netns_path = await self.network.prepare(pod.id)
                undo.push("tear down network", lambda: self.network.teardown(pod.id))
                await tap.create_tap(netns_path)
                crash_point("run_sandbox.netns")
                tap_fd = await tap.open_tap_fd(netns_path)
            nics = (TapNic(tap_fd, _device_mac(pod.id)),)
        spec = self._spec(pod, nics)
        return await self._boot_or_restore(pod, spec, undo)

    async def _boot_or_restore(self, pod: PodRecord, spec: VMSpec,
                               undo: UndoStack) -> tuple[VMSpec, VM, Template | None]:
        """`spec` booted, or restored from its shape's template: as started."""
        nics = spec.nics
        template = (await asyncio.to_thread(self.templates.ready, spec)
                    if self.templates is not None else None)
        if template is not None:
            spec = template.clone_spec(spec)
        undo.push("remove pod state dir", _sync(lambda: remove_pod_state_dir(spec.state_dir)))
        vm = VM(spec)
        try:
            with span("vm_start"):
                await vm.start()
        finally:
            for nic in nics:
                os.close(nic.fd)  # QEMU holds its own copy
        undo.push("kill vm", vm.kill)
        if template is not None:
            try:
                with span("vm_restore"):
                    await vm.restore_state(template.state)
            except CriError as exc:
                # Whatever broke the template, the pod's retry boots instead.
                assert self.templates is not None
                await asyncio.to_thread(self.templates.discard, template)
                raise type(exc)(f"pod {pod.id}: restore from template "
                                f"{template.directory.name}: {exc.message}") from exc
        return spec, vm, template

    async def _take_pooled(self, pod: PodRecord, pooled: PooledVM,
                           undo: UndoStack) -> tuple[VMSpec, VM]:
        """A warmed VM from the pool, made the pod's (pool.py)."""
        assert self.pool is not None
        volumes = self._volumes(pod.id)
        state_link = self._pod_state_dir(pod.id)
        undo.push("remove volumes dir", volumes.remove_all)
        if self.settings.network:
            undo.push("tear down network", lambda: self.network.teardown(pod.id))
        undo.push("remove pod state dir", _sync(lambda: remove_pod_state_dir(state_link)))
        undo.push("kill vm", pooled.vm.kill)
        with span("pool_hand_over"):
            await self.pool.hand_over(pooled, pod.id, state_link, volumes.directory)
        return pooled.spec, pooled.vm

    @contextlib.asynccontextmanager
    async def _scratch_nics(self, name: str, count: int) -> AsyncIterator[tuple[TapNic, ...]]:
        """Taps for a template VM: like a pod's, in a netns of their own that nothing joins."""
        if count == 0:
            yield ()
            return
        if count > 1:
            raise InvalidArgument(f"template {name}: pods have one NIC, not {count}")
        path = await self.network.prepare(f"{_TEMPLATE_NETNS}{name}")
        try:
            await tap.create_tap(path)
            fd = await tap.open_tap_fd(path)
            try:
                yield (TapNic(fd, TEMPLATE_MAC),)
            finally:
                os.close(fd)
        finally:
            await netns.remove(path)

    async def _connect_network(self, pod: PodRecord) -> GuestNetwork | None:
        """CNI ADD in the pod's netns, then the CNI interface's traffic redirected to the VM's
        tap (None without networking)."""
        if not self.settings.network:
            return None
        meta = pod.config.metadata
        mappings = [
            PortMapping(host_port=p.host_port, container_port=p.container_port,
                        protocol=PROTOCOLS.get(p.protocol, "tcp"), host_ip=p.host_ip)
            for p in pod.config.port_mappings if p.host_port > 0
        ]
        attachment = await self.network.connect(pod.id, meta.name, meta.namespace, meta.uid,
                                                mappings)
        try:
            _, guest = await tap.take_over(attachment.netns, attachment.ifname)
        except BaseException:
            # Not a bare DEL: take_over may have moved the addresses off the interface.
            try:
                await self.network.delete(pod.id)
            except Exception:
                log.exception("network setup undo failed pod=%s", pod.id)
            raise
        return GuestNetwork(attachment, guest)


    async def _vm_ended(self, pod_id: str, reason: str, message: str) -> None:
        self._pods.pop(pod_id, None)
        await self._guest_deletes.drop(pod_id)
        # The state first: the pod and its containers carry the VM's reason.
        await self.context.events.sandbox_exited(pod_id, reason, message)
        for cid in [c for c, io in self._io.items() if io.agent.pod_id == pod_id]:
            await self._io.pop(cid).close()

    async def stop_sandbox(self, pod: PodRecord) -> None:
        if pod.id in self._stopped:
            return  # RemovePodSandbox stops again what StopPodSandbox stopped: nothing is left
        handle = self._pods.pop(pod.id, None)
        await self._guest_deletes.drop(pod.id)  # moot: the guest goes with them
        with span("io_close"):
            for cid in [c for c, io in self._io.items() if io.agent.pod_id == pod.id]:
                await self._io.pop(cid).close()
        # CNI DEL while the guest syncs and QEMU goes (the pod's traffic ends either way); the
        # netns itself after QEMU is gone, as its tap fd pins it.
        deleting = asyncio.create_task(self._delete_network(pod.id)) \
            if self.settings.network else None
        try:
            if handle is None:
                with span("kill_leftover"):
                    await self._kill_leftover(pod)
            else:
                await self._power_off(handle)
        except BaseException:
            if deleting is not None:  # finished, not cut: DEL is repeated by the next stop
                await asyncio.wait({deleting})
                if not deleting.cancelled():
                    deleting.exception()  # retrieved: this stop's error is the one raised
            raise
        crash_point("stop_sandbox.vm_stopped")  # QEMU gone, CNI DEL done or under way
        if deleting is not None:
            with span("cni_teardown"):
                await self.network.remove_netns(pod.id, await deleting)
        crash_point("stop_sandbox.network_down")  # all of it gone, the pod still READY
        self._stopped.add(pod.id)
        log.info("pod vm stopped pod=%s", pod.id)

    async def _delete_network(self, pod_id: str) -> bool:
        with span("cni_del"):
            return await self.network.delete(pod_id)

    async def _power_off(self, handle: PodVM) -> None:
        handle.stopping = True
        grace = self.settings.stop_grace
        refused: CriError | None = None
        try:
            # What still runs ends now, as the CRI asks of StopPodSandbox (kubelet stops the
            # containers with their grace periods first). The agent syncs before it answers:
            # nothing of the guest's is worth its emulated power-off (~0.15 s under TCG).
            await handle.agent.shutdown()
        except CriError as exc:
            refused = exc
        with span("vm_exit"):
            if refused is None or handle.agent.violation is not None \
                    or isinstance(refused, DeadlineExceeded):
                # Synced; or a guest that broke the protocol or stopped answering for a whole
                # call timeout: nothing in it will power off cleanly, waiting only delays
                # the stop (measured: 20-30 s more per hostile pod).
                await handle.vm.quit()
            elif not await handle.vm.wait_exited(grace):  # an agent gone: maybe powering off
                await handle.vm.shutdown(grace)
            await handle.close()

    async def _kill_leftover(self, pod: PodRecord) -> None:
        """A VM this daemon does not hold (adoption failed, a crash mid-start): make sure it is
        gone. Raises if it survives: its state dir (and pidfile) must then stay."""
        await VM.kill_leftover(self._location(pod.id))

    async def remove_sandbox(self, pod: PodRecord) -> None:
        await self.stop_sandbox(pod)  # returns at once when it ran already
        crash_point("remove_sandbox.stopped")  # stopped, its containers' records removed
        with span("remove_files"):
            await self._volumes(pod.id).remove_all()
            crash_point("remove_sandbox.volumes")  # volumes gone, state and root dirs left
            await asyncio.to_thread(remove_pod_state_dir, self._pod_state_dir(pod.id))
            await asyncio.to_thread(shutil.rmtree, self._pod_root_dir(pod.id), True)
        crash_point("remove_sandbox.files")  # nothing of the pod left but its record
        self._stopped.discard(pod.id)

    async def sandbox_info(self, pod: PodRecord) -> dict[str, Any]:
        info: dict[str, Any] = dict(pod.backend)
        handle = self._pods.get(pod.id)
        if handle is not None:
            with contextlib.suppress(CriError):
                info["vmStatus"] = await handle.vm.status()
            info["agentConnection"] = handle.agent.state.value
        else:
            info["vmStatus"] = "not running"
        return info

    async def sandbox_stats(self, pod: PodRecord) -> cri.PodSandboxStats:
        return guest_metrics.pod_stats(pod, await self._guest_stats(pod, pb.StatsRequest()))

    async def sandbox_metrics(self, pod: PodRecord) -> PodSample:
        reply = await self._guest_stats(pod, pb.StatsRequest(details=True))
        return guest_metrics.pod_sample(reply)

    async def _guest_stats(self, pod: PodRecord, request: pb.StatsRequest) -> pb.StatsResponse:
        """The guest's readings. Callers asking the same pod the same thing at once (kubelet,
        a metrics scraper, crictl stats) share one agent call: each would otherwise queue its
        own in the emulated agent, and 20 at once took ~1 s each."""
        key = f"{pod.id}:{request.SerializeToString(deterministic=True).hex()}"
        agent = self._live(pod).agent
        return await self._stats_flight.run(key, lambda: agent.stats(request))

    # -- containers ------------------------------------------------------------------------

    async def create_container(
        self, pod: PodRecord, container: ContainerRecord, undo: UndoStack
    ) -> ContainerCreated:
        handle = self._live(pod)
        config = container.config
        images = self.context.images
        with span("image_lookup"):
            image = images.get(config.image.image) if images is not None else None
        if images is None or image is None:
            raise NotFound(f"image {config.image.image!r} is not present: pull it first")
        snapshot = images.snapshot_path(image.id)
        if self.pool is not None:
            self.pool.use_image(snapshot.name)
        volume_images: dict[str, str] = {}  # container_path -> image id
        guest_images: dict[str, str] = {}  # container_path -> where the agent binds the image
        agent_mounts: list[pb.Mount] = []
        for index, m in enumerate(config.mounts):
            if not m.image.image:
                continue
            mounted = images.get(m.image.image)
            if mounted is None:
                raise NotFound(f"image {m.image.image!r} of the image volume at "
                               f"{m.container_path} is not present: pull it first")
            volume_images[m.container_path] = mounted.id
            guest_images[m.container_path] = f"{IMAGE_VOLUMES_DIR}/{container.id}/{index}"
            agent_mounts.append(pb.Mount(
                type="erofs", source=f"image:{images.snapshot_path(mounted.id).name}",
                target=guest_images[m.container_path], sub_path=m.image_sub_path))
        volumes = self._volumes(pod.id)
        undo.push("release volumes", lambda: volumes.release(container.id))
        with span("volumes"):
            guest_volumes = {(m.host_path, _volume_mode(m)): await volumes.bind(
                container.id, m.host_path, _volume_mode(m)) for m in config.mounts
                if not m.image.image}
        crash_point("create_container.volumes")  # bind mounts in the pod's share, no guest call
        pid_mode = config.linux.security_context.namespace_options.pid
        with span("spec"):
            generated = await oci_spec.generate_async(
                config, pod.config, oci_spec.ImageConfigView.from_dict(image.config),
                # The agent replaces these with the guest's own namespace paths.
                oci_spec.PodNamespaces(ipc="/proc/1/ns/ipc", uts="/proc/1/ns/uts",
                                       pid="/proc/1/ns/pid" if pid_mode == cri.POD else None),
                lambda m: guest_volumes[(m.host_path, _volume_mode(m))].guest_path,
                policy=spec_policy.POLICY, container_id=container.id, sandbox_id=pod.id,
                image_name=config.image.image, sandbox_dir=RUN_DIR, image_volumes=guest_images,
            )
            # NODE is the policy's to refuse, above; TARGET is not built
            if pid_mode not in PID_MODES:
                raise Unimplemented(f"container pid namespace mode "
                                    f"{cri.NamespaceMode.Name(pid_mode)}"
                                    " is not supported in a micro-VM")
            generated.spec["mounts"] = with_submounts(
                generated.spec["mounts"], {v.guest_path: v for v in guest_volumes.values()})
            annotations = generated.spec.setdefault("annotations", {})
            annotations.pop(GUEST_DEVICES_ANNOTATION, None)  # never the user's to set
            if generated.guest_devices:
                annotations[GUEST_DEVICES_ANNOTATION] = "true"
            spec_json = generated.to_json()
        request = pb.CreateContainerRequest(
            request_id=f"create-{container.id}",
            container_id=container.id,
            sandbox_id=pod.id,
            oci_spec_json=spec_json,
            rootfs=pb.Rootfs(lowers=[pb.Mount(type="erofs", source=f"image:{snapshot.name}")],
                             read_only=config.linux.security_context.readonly_rootfs),
            stdio=pb.StdioOptions(tty=config.tty, stdin=config.stdin, stdin_once=config.stdin_once),
            user=generated.user_text(),
            pid_namespace=PID_MODES[pid_mode],
            mounts=agent_mounts,
            strict_supplemental_groups=not generated.merge_image_groups,
        )
        state = await handle.agent.call("CreateContainer", request, timeout=CREATE_TIMEOUT)
        undo.push("delete container in guest", lambda: handle.agent.call(
            "DeleteContainer", pb.DeleteContainerRequest(container_id=container.id, force=True)))
        crash_point("create_container.guest_created")  # made in the guest, the record INIT
        spec_file = self._pod_root_dir(pod.id) / f"{container.id}.json"
        with span("spec_file"):
            await asyncio.to_thread(files.write_atomic, spec_file, spec_json)
        crash_point("create_container.spec_written")  # all made, the record not yet CREATED
        digests = [d for d in image.repo_digests if d]
        return ContainerCreated(
            image_id=image.id,
            image_ref=digests[0] if digests else image.id,
            backend={"snapshot": str(snapshot), "volumes": len(guest_volumes)},
            volume_images=volume_images,
            user=(state.user.uid, state.user.gid, tuple(state.user.additional_gids))
            if state.HasField("user") else None,
        )

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        handle = self._live(pod)
        state = await handle.agent.call("StartContainer", pb.StartContainerRequest(
            request_id=f"start-{container.id}", container_id=container.id))
        crash_point("start_container.guest_started")  # runs in the guest, the record CREATED
        with span("follow"):
            self._follow(pod, container)
        return int(state.started_at_unix_nanos) or time.time_ns()

    def _follow(self, pod: PodRecord, container: ContainerRecord) -> None:
        """Pump the container's output into its log and report its exit."""
        io = ContainerIO(self._live(pod).agent, container.id, container.log_path,
                         self._pod_state_dir(pod.id) / f"{container.id[:16]}.offset",
                         self.context.events.container_exited)
        self._io[container.id] = io
        io.start()

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        handle = self._pods.get(pod.id)
        io = self._io.get(container.id)
        if handle is None or io is None:
            return  # the VM is gone: so is every process in it
        first = signal.SIGKILL if timeout <= 0 else self.stop_signal(container)
        await self._signal(handle, container.id, first)
        if first != signal.SIGKILL:
            with contextlib.suppress(TimeoutError), span("wait_exit"):
                await asyncio.wait_for(io.exited.wait(), timeout)
            if io.exited.is_set():
                return
            log.info("container ignored its stop signal, killing container=%s", container.id)
            await self._signal(handle, container.id, signal.SIGKILL)
        with contextlib.suppress(TimeoutError), span("wait_exit"):
            await asyncio.wait_for(io.exited.wait(), self.settings.stop_grace)

    async def _signal(self, handle: PodVM, container_id: str, signum: int) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):  # it exited meanwhile
            await handle.agent.call("SignalContainer", pb.SignalContainerRequest(
                container_id=container_id, signal=signum, all=signum == signal.SIGKILL))

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        io = self._io.pop(container.id, None)
        if io is not None:
            with span("io_close"):
                await io.close()
        if pod.id in self._pods:
            # Out of reach once its record goes: the guest finishes its delete meanwhile.
            with span("guest_delete_queued"):
                await self._guest_deletes.schedule(pod.id, container.id)
            crash_point("remove_container.guest_delete_queued")  # marked, the record still there
        with span("remove_files"):
            await self._volumes(pod.id).release(container.id)
            for leftover in (self._pod_root_dir(pod.id) / f"{container.id}.json",
                             self._pod_state_dir(pod.id) / f"{container.id[:16]}.offset"):
                await asyncio.to_thread(files.remove, leftover)  # and a crash's temp

    async def _delete_in_guest(self, pod_id: str, container_id: str) -> None:
        handle = self._pods.get(pod_id)
        if handle is None:
            return  # the guest is gone, and the container with it
        with contextlib.suppress(NotFound):  # deleted already (a repeat after a restart)
            await handle.agent.call("DeleteContainer", pb.DeleteContainerRequest(
                container_id=container_id, force=True))
        log.info("guest delete done container=%s pod=%s", container_id, pod_id)

    async def container_info(self, pod: PodRecord, container: ContainerRecord) -> dict[str, Any]:
        info: dict[str, Any] = dict(container.backend)
        spec_file = self._pod_root_dir(pod.id) / f"{container.id}.json"
        with contextlib.suppress(OSError, ValueError):
            info["ociSpec"] = json.loads(await asyncio.to_thread(spec_file.read_bytes))
        handle = self._pods.get(pod.id)
        if handle is not None:
            with contextlib.suppress(CriError):
                state = await handle.agent.call("GetContainerState", pb.ContainerRequest(
                    container_id=container.id))
                info["pid"] = state.pid
                info["guestStatus"] = guest_status_name(state.status)
        return info

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> cri.ContainerStats:
        return await self._stats_from_batch(pod, container)

    async def containers_stats(
        self, pod: PodRecord, containers: list[ContainerRecord]
    ) -> list[cri.ContainerStats]:
        if not containers:
            return []
        # One agent call measures them all (ListContainerStats asks once per pod).
        asked = {c.id: c for c in containers}
        reply = await self._guest_stats(pod, pb.StatsRequest(container_ids=sorted(asked)))
        return [guest_metrics.container_stats(stats, asked[stats.container_id])
                for stats in reply.containers if stats.container_id in asked]

    async def update_container_resources(
        self, pod: PodRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        await self._live(pod).agent.call("UpdateResources", pb.UpdateResourcesRequest(
            container_id=container.id,
            linux_resources_json=json.dumps(oci_spec.update_resources(resources)).encode()))

    async def reopen_container_log(self, pod: PodRecord, container: ContainerRecord) -> None:
        io = self._io.get(container.id)
        if io is None:
            raise FailedPrecondition(f"container {container.id} has no output being logged")
        await io.reopen_log()

    async def exec_sync(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], timeout: float
    ) -> ExecResult:
        reply = await self._live(pod).agent.exec_sync(pb.ExecSyncRequest(
            container_id=container.id, process=pb.Process(argv=cmd),
            timeout_seconds=max(timeout, 0), output_limit_bytes=MAX_EXEC_OUTPUT))
        if reply.timed_out:
            raise DeadlineExceeded(f"command {cmd!r} timed out after {timeout}s and was killed")
        return ExecResult(exit_code=reply.exit_code, stdout=reply.stdout, stderr=reply.stderr)

    # -- streaming (kubectl exec/attach/port-forward): relays in sandbox/streams.py -----------

    async def exec(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        return await streams.exec_in_vm(
            self._live(pod).agent, container.id, cmd, tty=tty, stdin=stdin, stdout=stdout,
            stderr=stderr, resize=resize)

    async def attach(
        self, pod: PodRecord, container: ContainerRecord, *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> None:
        await streams.attach_in_vm(
            self._live(pod).agent, container.id, tty=tty, stdin=stdin, stdout=stdout,
            stderr=stderr, resize=resize)

    async def port_forward(
        self, pod: PodRecord, port: int, *, inbound: ByteSource, outbound: ByteSink
    ) -> None:
        await streams.port_forward_in_vm(self._live(pod).agent, pod.id, port, inbound=inbound,
                                         outbound=outbound)


def guest_status_name(status: int) -> str:
    """A guest container status by name; one the protocol does not define (the agent's answers
    are untrusted) by number."""
    try:
        return pb.ContainerState.Status.Name(status)
    except ValueError:
        return f"UNDEFINED({status})"


def _guest_cid(pod_id: str) -> int:
    """A vsock CID for the pod, unique on the host in practice (CIDs 0-2 are reserved)."""
    return 3 + int(pod_id[:8], 16) % (2**31 - 3)


def _device_mac(pod_id: str) -> str:
    """A stable, locally administered unicast MAC for the pod's NIC until the agent sets the
    CNI interface's own."""
    octets = bytes.fromhex(pod_id[:10])
    return "02:" + ":".join(f"{b:02x}" for b in octets)


def _setup_request(pod: PodRecord, network: GuestNetwork | None,
                   nics: tuple[TapNic, ...] = ()) -> pb.SetupSandboxRequest:
    config = pod.config
    # A VM has no host name to inherit: without one the pod is named after itself.
    hostname = pod_files.pod_hostname(config)
    request = pb.SetupSandboxRequest(
        request_id=f"setup-{pod.id}",
        sandbox_id=pod.id,
        # A guest restored from a template has its clock and RNG state: both are renewed.
        realtime_ns=time.time_ns(),
        entropy=os.urandom(32),
        hostname=hostname,
        resolv_conf=pod_files.resolv_conf(config.dns_config),
        sysctls=dict(config.linux.sysctls),
        hosts=pod_files.hosts(hostname, network.attachment.ips if network else []),
    )
    if network is not None:
        guest = network.guest
        request.interfaces.append(pb.Interface(
            name=guest.name, mac=guest.mac, mtu=guest.mtu, addresses=guest.addresses,
            routes=[pb.Route(destination=r.dst, gateway=r.gateway or "") for r in guest.routes],
            device_mac=nics[0].mac if nics else ""))
    return request


def _volume_mode(m: cri.Mount) -> str:
    """How the host shares a CRI mount's path (shares.MODES); oci_spec refuses bad mixes."""
    return "rro" if m.recursive_read_only else "ro" if m.readonly else "rw"


def _last_lines(console: str, count: int = CONSOLE_TAIL_QUOTED, limit: int = 400) -> str:
    """What an error quotes of a console: the last `count` non-empty lines up to the last one
    that tells of a failure (a kernel panic's trace and registers say little to an operator),
    joined with " | " and cut to `limit` chars."""
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    telling = [i for i, line in enumerate(lines) if CONSOLE_FAILURE.search(line)]
    end = telling[-1] + 1 if telling else len(lines)
    return " | ".join(lines[max(0, end - count):end])[-limit:] or "(empty)"


def _sync(fn: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """An undo step from a plain function."""

    async def run() -> None:
        fn()

    return run
