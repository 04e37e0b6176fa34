"""The pod guest as a VM: the guest assets booted directly, with the kernel command line its
/init and agent read (vmagent.contract), as a VM spec of the shared VM layer.

This is the one way to describe a pod guest's VM: the backend, the template builder, the agent
tests and the benchmarks all build it here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from criserver.backends.microvm.channel import AgentAddress, AgentClient
from criserver.errors import InvalidArgument
from criserver.vm.assets import GuestAssets
from criserver.vm.qemu import (
    AgentTransport,
    DirectKernel,
    Disk,
    GuestMemory,
    Machine,
    SerialTransport,
    Share,
    TapNic,
    VMSpec,
    bus_kind,
)
from vmagent.contract import AGENT_PORT_NAME, CMDLINE_PREFIX

ROOT_DISK_ID = "root"
_SETTING_KEY = re.compile(r"^[a-z0-9_.-]+$")


@dataclass(frozen=True)
class GuestBoot:
    """What the pod guest is told on its kernel command line, beyond what its devices imply."""

    # Needed by microvm under TCG (the early TSC calibration hangs about 1 boot in 4 without).
    tsc_khz: int | None = None
    module_groups: tuple[str, ...] = ()  # extra /init module groups: net, overlay, 9p, loop
    settings: Mapping[str, str] = field(default_factory=dict)  # -> criserver.<key>=<value>
    kernel_args: tuple[str, ...] = ()
    # The smallest block free page reporting hands back (0: 4 KiB; the kernel's default 9,
    # 2 MiB, is a block an idle guest's freed memory never forms).
    page_reporting_order: int = 0


def pod_guest_spec(
    vm_id: str,
    state_dir: Path,
    assets: GuestAssets,
    transport: AgentTransport,
    boot: GuestBoot = GuestBoot(),
    *,
    machine: Machine = Machine.MICROVM,
    accel: str = "tcg",
    memory_mib: int = 256,
    vcpus: int = 1,
    nics: tuple[TapNic, ...] = (),
    shares: tuple[Share, ...] = (),
    pvpanic: bool = True,
    tcg_tb_size_mib: int = 0,
    free_page_reporting: bool = False,
    qemu_binary: str = "qemu-system-x86_64",
    memory_file: GuestMemory | None = None,
) -> VMSpec:
    """The VM spec of a pod guest booted from `assets`.

    :raises InvalidArgument: a setting the command line cannot carry.
    """
    if isinstance(transport, SerialTransport):
        transport = dataclasses.replace(transport, port_name=AGENT_PORT_NAME)
    spec = VMSpec(
        vm_id=vm_id,
        state_dir=state_dir,
        boot=DirectKernel(assets.kernel, assets.initramfs, ""),
        transport=transport,
        machine=machine,
        accel=accel,
        memory_mib=memory_mib,
        vcpus=vcpus,
        disks=(Disk(ROOT_DISK_ID, assets.root, assets.root_serial),),
        nics=nics,
        shares=shares,
        pvpanic=pvpanic,
        tcg_tb_size_mib=tcg_tb_size_mib,
        free_page_reporting=free_page_reporting,
        qemu_binary=qemu_binary,
        memory_file=memory_file,
    )
    return with_cmdline(spec, kernel_cmdline(spec, boot))


def kernel_cmdline(spec: VMSpec, boot: GuestBoot) -> str:
    """The command line the guest's /init and agent read (see guest/init.sh)."""
    if not 0 <= boot.page_reporting_order <= 10:
        raise InvalidArgument(f"vm {spec.vm_id}: bad page_reporting_order")
    transport = "serial" if isinstance(spec.transport, SerialTransport) else "vsock"
    args = [
        "console=ttyS0",
        "quiet",
        *([f"tsc_early_khz={boot.tsc_khz}"] if boot.tsc_khz else []),
        # Under TCG the clocksource watchdog sees emulated timer ticks lag and demotes the TSC
        # to 4 ms jiffies (coarse timers for the agent); the host TSC it reads is steady.
        "tsc=reliable",
        "cryptomgr.notests",
        # A panic reboots at once; QEMU turns the reboot into a shutdown the host sees.
        "panic=-1",
        f"{CMDLINE_PREFIX}bus={bus_kind(spec.machine)}",
        f"{CMDLINE_PREFIX}transport={transport}",
    ]
    groups = [*boot.module_groups]
    implied = (("net", bool(spec.nics)), ("9p", bool(spec.shares)),
               ("pvpanic", spec.pvpanic), ("balloon", spec.free_page_reporting))
    for group, needed in implied:
        if needed and group not in groups:
            groups.append(group)
    if spec.free_page_reporting:
        args.append(f"{CMDLINE_PREFIX}pr_order={boot.page_reporting_order}")
    if groups:
        args.append(f"{CMDLINE_PREFIX}modules=" + ",".join(groups))
    for key, value in sorted(boot.settings.items()):
        args.append(setting_word(spec.vm_id, key, value))
    args.extend(boot.kernel_args)
    return " ".join(args)


def setting_word(vm_id: str, key: str, value: str) -> str:
    """One agent setting as a command line word, `criserver.<key>=<value>`."""
    if not _SETTING_KEY.match(key) or not value or any(c.isspace() for c in value):
        raise InvalidArgument(f"vm {vm_id}: bad agent setting {key}={value!r}")
    return f"{CMDLINE_PREFIX}{key}={value}"


def with_cmdline(spec: VMSpec, cmdline: str) -> VMSpec:
    if not isinstance(spec.boot, DirectKernel):
        raise InvalidArgument(f"vm {spec.vm_id}: a pod guest boots its kernel directly")
    return dataclasses.replace(spec, boot=dataclasses.replace(spec.boot, cmdline=cmdline))


def as_template(spec: VMSpec) -> VMSpec:
    """`spec` booted to become a template: the agent prepares what clones share first."""
    assert isinstance(spec.boot, DirectKernel)
    return with_cmdline(spec, f"{spec.boot.cmdline} {setting_word(spec.vm_id, 'template', '1')}")


class TemplateBoot:
    """How a pod guest becomes a template (criserver.vm.template.TemplateGuest): booted
    with the template setting, ready once its agent answers."""

    def template_spec(self, spec: VMSpec) -> VMSpec:
        return as_template(spec)

    async def wait_ready(self, spec: VMSpec, deadline: float) -> None:
        if spec.transport is None:
            raise InvalidArgument(f"vm {spec.vm_id}: a pod guest needs an agent transport")
        agent = AgentClient(spec.vm_id, AgentAddress.of(spec.transport))
        try:
            await agent.wait_ready(deadline)
        finally:
            agent.close()
