"""The micro-VM backend: every pod a QEMU micro-VM, its containers run by the guest agent.

A pod is the composition of separate resources (sibling modules): the VM process and its QMP
session (`vm`, `qemu`), the agent channel (`channel`), the guest assets and the accelerator
(`assets`, `accel`). This class only orders them and undoes them; each resource knows how to
make and unmake itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import build_options
from criserver.errors import CriError, FailedPrecondition, InvalidArgument
from criserver.runtime.backend import (
    BackendContext,
    BackendStatus,
    BaseBackend,
    SandboxStarted,
)
from criserver.runtime.undo import UndoStack
from criserver.sandbox import accel, assets
from criserver.sandbox.channel import AgentAddress, AgentClient
from criserver.sandbox.podvm import PodVM
from criserver.sandbox.qemu import Machine, SerialTransport, VMSpec
from criserver.sandbox.vm import VM
from criserver.store.records import ContainerRecord, PodRecord, PodState
from vmagent.api import agent_pb2 as pb

log = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class MicroVMOptions:
    assets_dir: str = str(assets.DEFAULT_ASSETS_DIR)
    machine: str = "microvm"
    accelerator: str = "auto"  # auto (probe KVM, else TCG), kvm or tcg
    qemu_binary: str = "qemu-system-x86_64"
    default_memory_mib: int = 256
    memory_overhead_mib: int = 64
    default_vcpus: int = 1
    boot_timeout: float = 60.0
    stop_grace: float = 10.0


class MicroVMBackend(BaseBackend):
    name = "microvm"

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None:
        super().__init__(options, context)
        self.settings: MicroVMOptions = build_options(
            MicroVMOptions, options, f"runtimes.{context.handler}.options"
        )
        if self.settings.machine not in {m.value for m in Machine}:
            raise InvalidArgument(f"runtimes.{context.handler}.options.machine: "
                                  f"{self.settings.machine!r} is not microvm or q35")
        self._assets: assets.GuestAssets | None = None
        self._assets_error = "guest assets not loaded yet"
        self._accel: accel.Accel | None = None
        self._tsc_khz: int | None = None
        self._pods: dict[str, PodVM] = {}

    # -- daemon life -----------------------------------------------------------------------

    async def start(self, pods: list[PodRecord], containers: list[ContainerRecord]) -> None:
        try:
            self._assets = await asyncio.to_thread(assets.load, Path(self.settings.assets_dir))
        except assets.AssetsError as exc:
            self._assets_error = exc.message
            log.warning("micro-VM backend not ready: %s", exc.message)
        self._accel = await self._choose_accel()
        self._tsc_khz = await asyncio.to_thread(accel.read_tsc_khz)
        if self._accel.name == "tcg":
            log.warning("pods run under TCG (software emulation): %s", self._accel.reason)
        for pod in pods:
            if pod.state == PodState.READY:
                await self._adopt(pod)

    async def _choose_accel(self) -> accel.Accel:
        wanted = self.settings.accelerator
        if wanted in ("kvm", "tcg"):
            return accel.Accel(name=wanted, reason="set in the configuration")
        return await accel.detect(self.context.state, self._assets,
                                  qemu_binary=self.settings.qemu_binary)

    async def _adopt(self, pod: PodRecord) -> None:
        try:
            vm = await VM.adopt(self._spec(pod))
        except CriError as exc:
            log.warning("pod vm gone at daemon start pod=%s error=%s", pod.id, exc.message)
            await self.context.events.sandbox_exited(
                pod.id, "VMExited", "the VM was not running when the daemon restarted")
            return
        handle = PodVM(pod.id, vm, self._agent(pod))
        self._pods[pod.id] = handle
        handle.watch(self._vm_ended)
        try:
            await handle.agent.check()
        except CriError as exc:
            log.warning("agent not answering after adopt pod=%s error=%s", pod.id, exc.message)

    async def close(self) -> None:
        for handle in list(self._pods.values()):
            await handle.close()
        self._pods.clear()

    def status(self) -> BackendStatus:
        info: dict[str, Any] = {
            "backend": self.name,
            "machine": self.settings.machine,
            "accelerator": self._accel.name if self._accel else "unknown",
            "acceleratorReason": self._accel.reason if self._accel else "",
            "tscKhz": self._tsc_khz,
            "guestAssets": str(self._assets.path) if self._assets else self._assets_error,
            "guestKernel": self._assets.kernel_release if self._assets else "",
            "pods": len(self._pods),
        }
        ready = self._assets is not None and shutil.which(self.settings.qemu_binary) is not None
        return BackendStatus(
            runtime_ready=ready,
            runtime_reason="" if ready else "GuestAssetsMissing",
            runtime_message="" if ready else self._assets_error,
            network_ready=False,
            network_reason="NetworkPluginNotReady",
            network_message="pod networking (CNI into the micro-VM) is not wired in yet",
            info=info,
        )

    # -- sandboxes -------------------------------------------------------------------------

    def _pod_state_dir(self, pod_id: str) -> Path:
        # Short on purpose: the QMP and agent sockets in it must fit AF_UNIX's 107 bytes.
        return self.context.state / pod_id[:16]

    def _spec(self, pod: PodRecord) -> VMSpec:
        if self._assets is None:
            raise FailedPrecondition(self._assets_error)
        state_dir = self._pod_state_dir(pod.id)
        memory, vcpus = self._size(pod.config)
        return VMSpec(
            vm_id=pod.id,
            state_dir=state_dir,
            kernel=self._assets.kernel,
            initramfs=self._assets.initramfs,
            root_disk=self._assets.root,
            root_serial=self._assets.root_serial,
            transport=SerialTransport(state_dir / "agent.sock"),
            tsc_khz=self._tsc_khz,
            machine=Machine(self.settings.machine),
            accel=self._accel.name if self._accel else "tcg",
            memory_mib=memory,
            vcpus=vcpus,
            qemu_binary=self.settings.qemu_binary,
        )

    def _size(self, config: cri.PodSandboxConfig) -> tuple[int, int]:
        """Guest memory (MiB) and vCPUs: the pod's limits, or the defaults, plus overhead."""
        resources = config.linux.resources
        memory = (math.ceil(resources.memory_limit_in_bytes / MIB)
                  if resources.memory_limit_in_bytes > 0 else self.settings.default_memory_mib)
        vcpus = self.settings.default_vcpus
        if resources.cpu_quota > 0 and resources.cpu_period > 0:
            vcpus = math.ceil(resources.cpu_quota / resources.cpu_period)
        return memory + self.settings.memory_overhead_mib, max(1, min(vcpus, os.cpu_count() or 1))

    def _agent(self, pod: PodRecord) -> AgentClient:
        socket_path = self._pod_state_dir(pod.id) / "agent.sock"
        return AgentClient(pod.id, AgentAddress(unix_path=str(socket_path)))

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        if pod.config.linux.security_context.namespace_options.network == cri.NODE:
            raise InvalidArgument(
                "hostNetwork pods cannot run in a micro-VM: the VM has its own network stack")
        spec = self._spec(pod)
        started = time.monotonic()
        vm = VM(spec)
        undo.push("remove pod state dir", lambda: asyncio.to_thread(
            shutil.rmtree, spec.state_dir, True))
        await vm.start()
        undo.push("kill vm", vm.kill)
        handle = PodVM(pod.id, vm, self._agent(pod))
        undo.push("close agent", _async(handle.agent.close))
        deadline = time.monotonic() + self.settings.boot_timeout
        try:
            check = await handle.agent.wait_ready(deadline)
        except CriError as exc:
            raise type(exc)(f"pod {pod.id}: guest agent not ready: {exc.message}; "
                            f"console log: {spec.log_file}") from exc
        boot_ms = (time.monotonic() - started) * 1000
        await handle.agent.setup_sandbox(_setup_request(pod))
        self._pods[pod.id] = handle
        undo.push("forget vm", _async(lambda: self._pods.pop(pod.id, None)))
        handle.watch(self._vm_ended)
        log.info("pod vm ready pod=%s pid=%s boot_ms=%.0f accel=%s", pod.id, vm.pid, boot_ms,
                 spec.accel)
        return SandboxStarted(backend={
            "qemuPid": vm.pid,
            "stateDir": str(spec.state_dir),
            "accelerator": spec.accel,
            "machine": spec.machine.value,
            "memoryMiB": spec.memory_mib,
            "vcpus": spec.vcpus,
            "bootTimeMs": round(boot_ms),
            "guestKernel": check.kernel_release,
            "guestAssets": self._assets.version if self._assets else "",
            "consoleLog": str(spec.log_file),
        })

    async def _vm_ended(self, pod_id: str, reason: str, message: str) -> None:
        self._pods.pop(pod_id, None)
        await self.context.events.sandbox_exited(pod_id, reason, message)

    async def stop_sandbox(self, pod: PodRecord) -> None:
        handle = self._pods.pop(pod.id, None)
        if handle is None:
            await self._kill_leftover(pod)
            return
        handle.stopping = True
        grace = self.settings.stop_grace
        with contextlib.suppress(CriError):
            # The agent syncs and powers the guest off; QEMU exits on the guest's shutdown.
            await handle.agent.shutdown(grace_seconds=grace)
        if not await handle.vm.wait_exited(grace):
            await handle.vm.shutdown(grace)
        await handle.close()
        log.info("pod vm stopped pod=%s", pod.id)

    async def _kill_leftover(self, pod: PodRecord) -> None:
        """A VM this daemon does not hold (adoption failed, or half-made): make sure it is gone."""
        if self._assets is None:
            return
        with contextlib.suppress(CriError):
            vm = await VM.adopt(self._spec(pod), max_wait=2)
            await vm.kill()

    async def remove_sandbox(self, pod: PodRecord) -> None:
        if pod.id in self._pods:
            await self.stop_sandbox(pod)
        else:
            await self._kill_leftover(pod)
        await asyncio.to_thread(shutil.rmtree, self._pod_state_dir(pod.id), True)

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


def _setup_request(pod: PodRecord) -> pb.SetupSandboxRequest:
    config = pod.config
    return pb.SetupSandboxRequest(
        request_id=f"setup-{pod.id}",
        sandbox_id=pod.id,
        hostname=config.hostname,
        resolv_conf=_resolv_conf(config.dns_config),
        sysctls=dict(config.linux.sysctls),
        hosts=_hosts(config.hostname),
    )


def _resolv_conf(dns: cri.DNSConfig) -> str:
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "".join(f"{line}\n" for line in lines)


def _hosts(hostname: str) -> str:
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    if hostname:
        hosts += f"127.0.1.1\t{hostname}\n"
    return hosts


def _async(fn: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """An undo step from a plain function."""

    async def run() -> None:
        fn()

    return run
