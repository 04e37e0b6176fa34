"""The micro-VM backend: every pod a QEMU micro-VM, its containers run by the guest agent.

A pod is the composition of separate resources (see the sibling modules): the VM process and its
QMP session, the agent channel, the network, the file shares. This class only orders them and
undoes them; each resource knows how to make and unmake itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from criserver.config import build_options
from criserver.runtime.backend import BackendContext, BackendStatus, BaseBackend


@dataclass(frozen=True)
class MicroVMOptions:
    assets_dir: str = "/usr/local/share/criserver/guest"
    machine: str = "microvm"
    accelerator: str = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    default_memory_mib: int = 256
    memory_overhead_mib: int = 64
    default_vcpus: int = 1
    boot_timeout: float = 60.0


class MicroVMBackend(BaseBackend):
    name = "microvm"

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None:
        super().__init__(options, context)
        self.settings: MicroVMOptions = build_options(
            MicroVMOptions, options, f"runtimes.{context.handler}.options"
        )

    def status(self) -> BackendStatus:
        return BackendStatus(
            runtime_ready=False,
            runtime_reason="MicroVMNotReady",
            runtime_message="the micro-VM backend cannot start pods yet",
            network_ready=False,
            network_reason="NetworkPluginNotReady",
            network_message="pod networking is not set up yet",
        )
