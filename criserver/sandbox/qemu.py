"""The QEMU command line of a pod's micro-VM, built in one place from a typed spec.

Nothing here runs QEMU: `vm.py` does. Keeping the argv pure makes it unit-testable and lets the
lead compose extra devices (taps, image disks) through the spec's hook fields.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from criserver.errors import InvalidArgument

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT_NAME = "criserver.agent"
AGENT_VSOCK_PORT = 1024
# A Unix socket path must fit sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107
_SETTING_KEY = re.compile(r"^[a-z0-9_.-]+$")
# virtio-9p mount tags: short, and no characters QEMU's option parser or mount(8) would mangle.
_SHARE_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class Machine(enum.StrEnum):
    # microvm: virtio-mmio, no PCI, no firmware; q35: PCI (hotplug later) for ~0.1 s more boot.
    MICROVM = "microvm"
    Q35 = "q35"


@dataclass(frozen=True)
class SerialTransport:
    """Agent over a virtio-serial port; the host end is a listening Unix socket."""

    socket_path: Path


@dataclass(frozen=True)
class VsockTransport:
    """Agent over vsock (needs /dev/vhost-vsock on the host); guest listens on port 1024."""

    guest_cid: int


AgentTransport = SerialTransport | VsockTransport


@dataclass(frozen=True)
class TapNic:
    """A virtio-net NIC on a tap the network code opened inside the pod's netns: QEMU runs in
    the host's netns, so it gets the tap as an inherited fd, never by name."""

    fd: int
    mac: str
    mtu: int = 0  # advertised to the guest (virtio host_mtu); 0: not advertised


@dataclass(frozen=True)
class ExtraDisk:
    """An extra virtio-blk disk, found in the guest by its serial (e.g. an image layer)."""

    path: Path
    serial: str
    read_only: bool = True


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-9p, mounted there by `tag`."""

    tag: str
    path: Path
    read_only: bool = True


@dataclass(frozen=True)
class GuestMemory:
    """Guest RAM backed by a file instead of anonymous memory. A template VM maps it shared (the
    file receives the guest's pages); a clone maps the template's file privately: it reads the
    template's pages from the host's page cache, shared by every clone, and its own writes stay
    private (copy-on-write)."""

    path: Path
    shared: bool


@dataclass(frozen=True)
class VMSpec:
    vm_id: str  # the pod sandbox id: names the VM in logs and errors
    state_dir: Path  # per-pod directory for the QMP socket, pidfile and logs
    kernel: Path
    initramfs: Path
    root_disk: Path
    transport: AgentTransport
    tsc_khz: int | None  # required by microvm under TCG (boot hangs otherwise)
    root_serial: str = "criserver-root"
    machine: Machine = Machine.MICROVM
    accel: str = "tcg"
    memory_mib: int = 256
    vcpus: int = 1
    module_groups: tuple[str, ...] = ()  # extra /init module groups: net, overlay, 9p, loop
    agent_settings: Mapping[str, str] = field(default_factory=dict)  # -> criserver.<k>=<v>
    kernel_args: tuple[str, ...] = ()
    nics: tuple[TapNic, ...] = ()
    disks: tuple[ExtraDisk, ...] = ()
    shares: tuple[Share, ...] = ()  # virtio-9p exports (images, volumes); needs the 9p group
    pvpanic: bool = True
    # TCG translation cache, MiB (0: QEMU's default, up to 1 GiB; an idle guest fills ~76).
    tcg_tb_size_mib: int = 0
    # virtio-balloon free page reporting: blocks the guest frees go back to the host. The order
    # is the smallest block reported (0: 4 KiB; the kernel's default 9, 2 MiB, is a block an
    # idle guest's freed memory never forms).
    free_page_reporting: bool = False
    page_reporting_order: int = 0
    qemu_binary: str = QEMU_BINARY
    memory_file: GuestMemory | None = None
    # QEMU starts paused and waits for a device state (`migrate-incoming`): a clone restored
    # from a template instead of booting.
    incoming: bool = False

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "qemu.pid"

    @property
    def log_file(self) -> Path:
        """QEMU's own stderr and the guest's serial console, one file per pod."""
        return self.state_dir / "vm.log"


def _bus_device(machine: Machine, kind: str) -> str:
    # microvm only has virtio-mmio ("-device"), q35 has PCI ("-pci").
    return f"{kind}-{'device' if machine is Machine.MICROVM else 'pci'}"


def kernel_cmdline(spec: VMSpec) -> str:
    transport = "serial" if isinstance(spec.transport, SerialTransport) else "vsock"
    args = [
        "console=ttyS0",
        "quiet",
        # TCG exposes the host TSC to the guest; without the rate the early calibration can hang
        # the microvm guest (about 1 boot in 4).
        *([f"tsc_early_khz={spec.tsc_khz}"] if spec.tsc_khz else []),
        # Under TCG the clocksource watchdog sees emulated timer ticks lag and demotes the TSC
        # to 4 ms jiffies (coarse timers for the agent); the host TSC it reads is steady.
        "tsc=reliable",
        "cryptomgr.notests",
        # A panic reboots at once; QEMU turns the reboot into a shutdown the host sees.
        "panic=-1",
        f"criserver.bus={'mmio' if spec.machine is Machine.MICROVM else 'pci'}",
        f"criserver.transport={transport}",
    ]
    groups = [*spec.module_groups]
    if spec.nics and "net" not in groups:
        groups.append("net")
    if spec.shares and "9p" not in groups:
        groups.append("9p")
    if spec.pvpanic and "pvpanic" not in groups:
        groups.append("pvpanic")
    if spec.free_page_reporting and "balloon" not in groups:
        groups.append("balloon")
        args.append(f"criserver.pr_order={spec.page_reporting_order}")
    if groups:
        args.append("criserver.modules=" + ",".join(groups))
    for key, value in sorted(spec.agent_settings.items()):
        if not _SETTING_KEY.match(key) or not value or any(c.isspace() for c in value):
            raise InvalidArgument(f"vm {spec.vm_id}: bad agent setting {key}={value!r}")
        args.append(f"criserver.{key}={value}")
    args.extend(spec.kernel_args)
    return " ".join(args)


def _check(spec: VMSpec) -> None:
    sockets = [spec.qmp_socket]
    if isinstance(spec.transport, SerialTransport):
        sockets.append(spec.transport.socket_path)
    for s in sockets:
        if len(str(s)) > _MAX_SOCKET_PATH:
            raise InvalidArgument(f"vm {spec.vm_id}: socket path too long for AF_UNIX: {s}")
    if isinstance(spec.transport, VsockTransport) and spec.transport.guest_cid < 3:
        raise InvalidArgument(f"vm {spec.vm_id}: vsock guest CID must be >= 3")
    for nic in spec.nics:
        if not _MAC.match(nic.mac):
            raise InvalidArgument(f"vm {spec.vm_id}: bad MAC address {nic.mac!r}")
    for share in spec.shares:
        if not _SHARE_TAG.match(share.tag):
            raise InvalidArgument(f"vm {spec.vm_id}: bad 9p share tag {share.tag!r}")
    paths = (spec.kernel, spec.initramfs, spec.root_disk, *(d.path for d in spec.disks),
             *([spec.memory_file.path] if spec.memory_file else []))
    for p in (*paths, *(sh.path for sh in spec.shares)):
        if "," in str(p):
            # QEMU option syntax would need ",," escaping; our paths never need commas.
            raise InvalidArgument(f"vm {spec.vm_id}: path contains a comma: {p}")
    if spec.memory_mib < 64 or spec.vcpus < 1:
        raise InvalidArgument(f"vm {spec.vm_id}: needs >= 64 MiB and >= 1 vCPU")
    if spec.tcg_tb_size_mib < 0 or not 0 <= spec.page_reporting_order <= 10:
        raise InvalidArgument(f"vm {spec.vm_id}: bad tcg_tb_size_mib or page_reporting_order")
    if spec.memory_file is not None and spec.free_page_reporting and not spec.memory_file.shared:
        # QEMU 7.2 discards a reported page of a file-backed RAM block by punching a hole in
        # the file: in a clone that would zero the template's page under every clone.
        raise InvalidArgument(f"vm {spec.vm_id}: free page reporting cannot be used with a "
                              "private memory file")


def nic_args(nic: TapNic, machine: Machine = Machine.MICROVM, index: int = 0) -> list[str]:
    """The -netdev/-device pair of one tap NIC."""
    return [
        "-netdev", f"tap,id=net{index},fd={nic.fd},vhost=off",
        "-device", f"{_bus_device(machine, 'virtio-net')},netdev=net{index},mac={nic.mac}"
        + (f",host_mtu={nic.mtu}" if nic.mtu else ""),
    ]


def _accel_option(spec: VMSpec) -> str:
    if spec.accel == "tcg" and spec.tcg_tb_size_mib > 0:
        return f"tcg,tb-size={spec.tcg_tb_size_mib}"
    return spec.accel


def _memory_args(spec: VMSpec) -> list[str]:
    if spec.memory_file is None:
        return []
    share = "on" if spec.memory_file.shared else "off"
    return ["-object", f"memory-backend-file,id=ram,size={spec.memory_mib}M,"
            f"mem-path={spec.memory_file.path},share={share}"]


def build_command(spec: VMSpec) -> list[str]:
    """The full argv for QEMU. QEMU daemonizes: the caller waits for the parent to exit.

    :raises InvalidArgument: for values QEMU would reject or misparse.
    """
    _check(spec)
    m = spec.machine
    if m is Machine.MICROVM:
        # ACPI stays on: Debian kernels find virtio-mmio devices only through ACPI.
        machine = "microvm,acpi=on"
    else:
        machine = "q35"
    if spec.memory_file is not None:
        machine += ",memory-backend=ram"
    # +rdrand under TCG: QEMU feeds it from the host's getrandom, and the guest kernel's RNG is
    # then ready at once instead of after ~1 s of gathering entropy that Python start-up waits
    # for (measured: first agent byte 5.38 -> 4.44 s).
    cpu = "host" if spec.accel == "kvm" else "qemu64,+rdrand"
    # fmt: off
    argv = [
        spec.qemu_binary,
        "-name", f"{spec.vm_id},process=criserver-vm",
        "-machine", machine,
        "-accel", _accel_option(spec),
        "-cpu", cpu,
        "-m", str(spec.memory_mib),
        *_memory_args(spec),
        "-smp", str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        # A pod VM never reboots: a guest reboot (or a panic via panic=-1) ends QEMU.
        "-action", "reboot=shutdown,panic=shutdown",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initramfs),
        "-append", kernel_cmdline(spec),
        "-chardev", f"file,id=console,path={spec.log_file},append=on",
        "-serial", "chardev:console",
        "-drive", f"file={spec.root_disk},if=none,id=root,format=raw,readonly=on",
        "-device", f"{_bus_device(m, 'virtio-blk')},drive=root,serial={spec.root_serial}",
    ]
    # fmt: on
    if isinstance(spec.transport, SerialTransport):
        # fmt: off
        argv += [
            "-device", f"{_bus_device(m, 'virtio-serial')},id=vser0,max_ports=2",
            "-chardev", f"socket,id=agent,path={spec.transport.socket_path},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]
        # fmt: on
    else:
        vsock = "vhost-vsock-device" if m is Machine.MICROVM else "vhost-vsock-pci"
        argv += ["-device", f"{vsock},guest-cid={spec.transport.guest_cid}"]
    for i, disk in enumerate(spec.disks):
        ro = "on" if disk.read_only else "off"
        # fmt: off
        argv += [
            "-drive", f"file={disk.path},if=none,id=disk{i},format=raw,readonly={ro}",
            "-device", f"{_bus_device(m, 'virtio-blk')},drive=disk{i},serial={disk.serial}",
        ]
        # fmt: on
    for i, nic in enumerate(spec.nics):
        argv += nic_args(nic, m, i)
    for i, share in enumerate(spec.shares):
        ro = ",readonly=on" if share.read_only else ""
        # fmt: off
        argv += [
            # security_model=none: files keep the host's owners; QEMU (root) does the access.
            # multidevs=remap: a share spanning host filesystems keeps unique inode numbers.
            "-fsdev",
            f"local,id=fs{i},path={share.path},security_model=none,multidevs=remap{ro}",
            "-device", f"{_bus_device(m, 'virtio-9p')},fsdev=fs{i},mount_tag={share.tag}",
        ]
        # fmt: on
    if spec.free_page_reporting:
        argv += ["-device", f"{_bus_device(m, 'virtio-balloon')},free-page-reporting=on"]
    if spec.pvpanic:
        # ISA pvpanic: reported to the guest through ACPI on both machines -> GUEST_PANICKED.
        argv += ["-device", "pvpanic"]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    # fmt: off
    argv += [
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-msg", "timestamp=on",
        "-daemonize",
        "-pidfile", str(spec.pidfile),
    ]
    # fmt: on
    return argv
