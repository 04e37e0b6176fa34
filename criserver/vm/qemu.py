"""The QEMU command line of a VM, built in one place from a typed spec.

The spec knows nothing of pods or of the guest agent's protocol: a boot source (a kernel with
its command line, or firmware and a disk), named devices, a reboot policy and an optional agent
port. What a guest expects on its kernel command line is its owner's business (the micro-VM
backend's pod guest: criserver/backends/microvm/guest.py). Nothing here runs QEMU: `vm.py` does.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path

from criserver.errors import InvalidArgument

QEMU_BINARY = "qemu-system-x86_64"
# A Unix socket path must fit sun_path (108 bytes with the NUL).
MAX_SOCKET_PATH = 107
_DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")  # QEMU's id syntax, kept short
# virtio-9p mount tags: short, and no characters QEMU's option parser or mount(8) would mangle.
_SHARE_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")
# QEMU wants user entries under opt/ (the rest is the firmware's), 55 bytes at most.
_FW_CFG_NAME = re.compile(r"^opt/[A-Za-z0-9_./-]{1,51}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
HOTPLUG_PORT = "hotplug"  # hotplug<n>: the root ports of VMSpec.hotplug_slots


class Machine(enum.StrEnum):
    # microvm: virtio-mmio, no PCI, no firmware; q35: PCI (hotplug later) for ~0.1 s more boot.
    MICROVM = "microvm"
    Q35 = "q35"


class RebootPolicy(enum.StrEnum):
    # A pod VM never reboots: a guest reboot (or a panic with panic=-1) ends QEMU.
    SHUTDOWN = "shutdown"
    # A whole machine (IRI) reboots in place, like a physical one.
    RESET = "reset"


@dataclass(frozen=True)
class DirectKernel:
    """Boot a kernel directly (no firmware): the fastest start, used by pod guests."""

    kernel: Path
    initramfs: Path | None
    cmdline: str


@dataclass(frozen=True)
class Firmware:
    """Boot through firmware from the first disk (QEMU's SeaBIOS unless `path` is given)."""

    path: Path | None = None


BootSource = DirectKernel | Firmware


@dataclass(frozen=True)
class SerialTransport:
    """Agent over a virtio-serial port; the host end is a listening Unix socket."""

    socket_path: Path
    port_name: str = "agent"  # the guest finds its port by this name


@dataclass(frozen=True)
class VsockTransport:
    """Agent over vsock (needs /dev/vhost-vsock on the host)."""

    guest_cid: int


AgentTransport = SerialTransport | VsockTransport


@dataclass(frozen=True)
class TapNic:
    """A virtio-net NIC on a tap opened inside a network namespace: QEMU runs in the host's
    netns, so it gets the tap as an inherited fd (or over QMP with getfd), never by name.
    `id` names the device for device_del; empty: net<index>."""

    fd: int
    mac: str
    mtu: int = 0  # advertised to the guest (virtio host_mtu); 0: not advertised
    id: str = ""


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk, found in the guest by its serial. `id` names the QMP block node and
    the device (device_del, blockdev-del)."""

    id: str
    path: Path
    serial: str = ""
    read_only: bool = True
    format: str = "raw"  # raw or qcow2


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-9p, mounted there by `tag`."""

    tag: str
    path: Path
    read_only: bool = True


@dataclass(frozen=True)
class FwCfgFile:
    """A file the guest reads through QEMU's firmware configuration device, by `name` (e.g.
    Ignition's opt/com.coreos/config, under /sys/firmware/qemu_fw_cfg/by_name in Linux)."""

    name: str
    path: Path


@dataclass(frozen=True)
class GuestMemory:
    """Guest RAM backed by a file instead of anonymous memory. A template VM maps it shared (the
    file receives the guest's pages); a clone maps the template's file privately: it reads the
    template's pages from the host's page cache, shared by every clone, and its own writes stay
    private (copy-on-write)."""

    path: Path
    shared: bool


@dataclass(frozen=True)
class VMLocation:
    """Where a VM's QEMU is found again (by a restarted daemon, or to kill it): no boot
    details needed, so a VM can be adopted or killed even when its assets are gone."""

    vm_id: str
    state_dir: Path
    machine: Machine = Machine.MICROVM

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "qemu.pid"

    @property
    def log_file(self) -> Path:
        """QEMU's own stderr and the guest's serial console, one file per VM."""
        return self.state_dir / "vm.log"

    @property
    def console_socket(self) -> Path:
        """The serial console's socket, for VMs with an interactive console."""
        return self.state_dir / "console.sock"


@dataclass(frozen=True)
class VMSpec:
    vm_id: str  # names the VM in logs, errors and QEMU's process name
    state_dir: Path  # the VM's own directory: QMP socket, pidfile, log (found again by it)
    boot: BootSource
    transport: AgentTransport | None = None  # the agent port, for guests that have an agent
    machine: Machine = Machine.MICROVM
    accel: str = "tcg"
    memory_mib: int = 256
    vcpus: int = 1
    reboot: RebootPolicy = RebootPolicy.SHUTDOWN
    disks: tuple[Disk, ...] = ()
    nics: tuple[TapNic, ...] = ()
    shares: tuple[Share, ...] = ()  # virtio-9p exports
    # Empty PCIe root ports (q35 only) that disks and NICs can be hot-added to.
    hotplug_slots: int = 0
    pvpanic: bool = True
    # TCG translation cache, MiB (0: QEMU's default, up to 1 GiB; an idle guest fills ~76).
    tcg_tb_size_mib: int = 0
    # virtio-balloon free page reporting: blocks the guest frees go back to the host.
    free_page_reporting: bool = False
    qemu_binary: str = QEMU_BINARY
    memory_file: GuestMemory | None = None
    # QEMU starts paused and waits for a device state (`migrate-incoming`): a clone restored
    # from a template instead of booting.
    incoming: bool = False
    fw_cfg: tuple[FwCfgFile, ...] = ()
    # The disks and NICs given at start sit in hotplug ports too (q35), so each can be
    # unplugged later and `VM.devices()` lists every one: what a whole machine needs.
    unpluggable_devices: bool = False
    # The serial console is also a listening socket (one client at a time) for an interactive
    # session; its output still goes to the log file either way.
    interactive_console: bool = False

    @property
    def location(self) -> VMLocation:
        return VMLocation(self.vm_id, self.state_dir, self.machine)

    @property
    def qmp_socket(self) -> Path:
        return self.location.qmp_socket

    @property
    def pidfile(self) -> Path:
        return self.location.pidfile

    @property
    def log_file(self) -> Path:
        return self.location.log_file

    @property
    def console_socket(self) -> Path:
        return self.location.console_socket


def bus_kind(machine: Machine) -> str:
    """How the guest finds its virtio devices: "mmio" (microvm) or "pci" (q35)."""
    return "mmio" if machine is Machine.MICROVM else "pci"


def _bus_device(machine: Machine, kind: str) -> str:
    # microvm only has virtio-mmio ("-device"), q35 has PCI ("-pci").
    return f"{kind}-{'device' if machine is Machine.MICROVM else 'pci'}"


def _check(spec: VMSpec) -> None:
    sockets = [spec.qmp_socket]
    if spec.interactive_console:
        sockets.append(spec.console_socket)
    if isinstance(spec.transport, SerialTransport):
        sockets.append(spec.transport.socket_path)
    for s in sockets:
        if len(str(s)) > MAX_SOCKET_PATH:
            raise InvalidArgument(f"vm {spec.vm_id}: socket path too long for AF_UNIX: {s}")
    if isinstance(spec.transport, VsockTransport) and spec.transport.guest_cid < 3:
        raise InvalidArgument(f"vm {spec.vm_id}: vsock guest CID must be >= 3")
    for nic in spec.nics:
        check_nic(spec.vm_id, nic)
    ids = [d.id for d in spec.disks] + [n.id for n in spec.nics if n.id]
    for device_id in ids:
        if not _DEVICE_ID.match(device_id):
            raise InvalidArgument(f"vm {spec.vm_id}: bad device id {device_id!r}")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"vm {spec.vm_id}: device ids repeat: {ids}")
    if (spec.hotplug_slots or spec.unpluggable_devices) and spec.machine is not Machine.Q35:
        raise InvalidArgument(f"vm {spec.vm_id}: hotplug needs the q35 machine (PCIe)")
    if spec.unpluggable_devices and len(spec.disks) + len(spec.nics) > spec.hotplug_slots:
        raise InvalidArgument(f"vm {spec.vm_id}: {len(spec.disks)} disks and "
                              f"{len(spec.nics)} NICs need as many hotplug slots, "
                              f"not {spec.hotplug_slots}")
    if isinstance(spec.boot, Firmware) and not spec.disks:
        raise InvalidArgument(f"vm {spec.vm_id}: a firmware boot needs a disk to boot from")
    for share in spec.shares:
        if not _SHARE_TAG.match(share.tag):
            raise InvalidArgument(f"vm {spec.vm_id}: bad 9p share tag {share.tag!r}")
    for entry in spec.fw_cfg:
        if not _FW_CFG_NAME.match(entry.name):
            raise InvalidArgument(f"vm {spec.vm_id}: bad fw_cfg name {entry.name!r}")
    paths = (*boot_paths(spec.boot), *(d.path for d in spec.disks),
             *(f.path for f in spec.fw_cfg),
             *([spec.memory_file.path] if spec.memory_file else []))
    for p in (*paths, *(sh.path for sh in spec.shares)):
        if "," in str(p):
            # QEMU option syntax would need ",," escaping; our paths never need commas.
            raise InvalidArgument(f"vm {spec.vm_id}: path contains a comma: {p}")
    if spec.memory_mib < 64 or spec.vcpus < 1:
        raise InvalidArgument(f"vm {spec.vm_id}: needs >= 64 MiB and >= 1 vCPU")
    if spec.tcg_tb_size_mib < 0:
        raise InvalidArgument(f"vm {spec.vm_id}: bad tcg_tb_size_mib")
    if spec.memory_file is not None and spec.free_page_reporting and not spec.memory_file.shared:
        # QEMU 7.2 discards a reported page of a file-backed RAM block by punching a hole in
        # the file: in a clone that would zero the template's page under every clone.
        raise InvalidArgument(f"vm {spec.vm_id}: free page reporting cannot be used with a "
                              "private memory file")


def check_nic(vm_id: str, nic: TapNic) -> None:
    if not _MAC.match(nic.mac):
        raise InvalidArgument(f"vm {vm_id}: bad MAC address {nic.mac!r}")


def boot_paths(boot: BootSource) -> tuple[Path, ...]:
    if isinstance(boot, DirectKernel):
        return (boot.kernel, *([boot.initramfs] if boot.initramfs else []))
    return (boot.path,) if boot.path else ()


def nic_id(nic: TapNic, index: int) -> str:
    return nic.id or f"net{index}"


def netdev_options(nic: TapNic, netdev_id: str, fd: str | int) -> dict[str, object]:
    """The tap backend of a NIC, as QMP netdev_add arguments (and -netdev at start)."""
    return {"type": "tap", "id": netdev_id, "fd": str(fd), "vhost": False}


def nic_device(machine: Machine, nic: TapNic, device_id: str, netdev_id: str) -> dict[str, object]:
    """The virtio-net device of a NIC, as QMP device_add arguments (and -device at start)."""
    device: dict[str, object] = {"driver": _bus_device(machine, "virtio-net"), "id": device_id,
                                 "netdev": netdev_id, "mac": nic.mac}
    if nic.mtu:
        device["host_mtu"] = nic.mtu
    return device


def disk_node(disk: Disk) -> dict[str, object]:
    """The block node of a disk, as QMP blockdev-add arguments (and -blockdev at start)."""
    return {"driver": disk.format, "node-name": f"{disk.id}-node", "read-only": disk.read_only,
            "file": {"driver": "file", "filename": str(disk.path), "read-only": disk.read_only}}


def disk_device(machine: Machine, disk: Disk) -> dict[str, object]:
    """The virtio-blk device of a disk, as QMP device_add arguments (and -device at start)."""
    device: dict[str, object] = {"driver": _bus_device(machine, "virtio-blk"), "id": disk.id,
                                 "drive": f"{disk.id}-node"}
    if disk.serial:
        device["serial"] = disk.serial
    return device


def nic_args(nic: TapNic, machine: Machine = Machine.MICROVM, index: int = 0,
             bus: str = "") -> list[str]:
    """The -netdev/-device pair of one tap NIC (on `bus` when given)."""
    device_id = nic_id(nic, index)
    netdev = f"{device_id}-netdev"
    device = nic_device(machine, nic, device_id, netdev)
    if bus:
        device["bus"] = bus
    return ["-netdev", _option(netdev_options(nic, netdev, nic.fd), "type"),
            "-device", _option(device, "driver")]


def _cold_ports(spec: VMSpec) -> list[str]:
    """The hotplug ports the devices given at start take, in order (disks, then NICs)."""
    if not spec.unpluggable_devices:
        return []
    return [f"{HOTPLUG_PORT}{i}" for i in range(len(spec.disks) + len(spec.nics))]


def _option(props: dict[str, object], first: str) -> str:
    """QMP-style properties as a QEMU command-line option string, `first` leading."""
    def text(v: object) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else str(v)

    return ",".join([text(props[first])] + [f"{k}={text(v)}" for k, v in props.items()
                                            if k != first])


def _boot_args(boot: BootSource) -> list[str]:
    if isinstance(boot, Firmware):
        return ["-bios", str(boot.path)] if boot.path else []
    argv = ["-kernel", str(boot.kernel), "-append", boot.cmdline]
    if boot.initramfs:
        argv += ["-initrd", str(boot.initramfs)]
    return argv


def _console_chardev(spec: VMSpec) -> str:
    if spec.interactive_console:
        # The log keeps everything the guest prints, whether or not a client is connected.
        return (f"socket,id=console,path={spec.console_socket},server=on,wait=off,"
                f"logfile={spec.log_file},logappend=on")
    return f"file,id=console,path={spec.log_file},append=on"


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
        # ACPI stays on: Debian kernels find virtio-mmio devices only through ACPI. No legacy
        # PIT and PIC: the guest times with the local APIC and the TSC (tsc_early_khz), and an
        # emulated PIT kept QEMU's main loop waking ~70 times a second in an idle pod (strace:
        # 90 -> 22 ppoll returns a second).
        machine = "microvm,acpi=on,pit=off,pic=off"
    else:
        machine = "q35"
    if spec.memory_file is not None:
        machine += ",memory-backend=ram"
    # +rdrand under TCG: QEMU feeds it from the host's getrandom, and the guest kernel's RNG is
    # then ready at once instead of after ~1 s of gathering entropy that Python start-up waits
    # for (measured: first agent byte 5.38 -> 4.44 s).
    # +arat (the local APIC timer keeps running in deep idle; TCG's does): without it Linux
    # keeps the 250 Hz tick of an idle guest, and each tick wakes QEMU's vCPU and main loop
    # (measured, 4 idle clones: 2.90% -> 0.54% of a core per pod, 253 -> 9 timer IRQs/s).
    cpu = "host" if spec.accel == "kvm" else "qemu64,+rdrand,+arat"
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
        "-action", f"reboot={spec.reboot.value},panic=shutdown",
        *_boot_args(spec.boot),
        "-chardev", _console_chardev(spec),
        "-serial", "chardev:console",
    ]
    # fmt: on
    for entry in spec.fw_cfg:
        argv += ["-fw_cfg", f"name={entry.name},file={entry.path}"]
    if isinstance(spec.transport, SerialTransport):
        # fmt: off
        argv += [
            "-device", f"{_bus_device(m, 'virtio-serial')},id=vser0,max_ports=2",
            "-chardev", f"socket,id=agent,path={spec.transport.socket_path},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=agent,name={spec.transport.port_name}",
        ]
        # fmt: on
    elif isinstance(spec.transport, VsockTransport):
        vsock = "vhost-vsock-device" if m is Machine.MICROVM else "vhost-vsock-pci"
        argv += ["-device", f"{vsock},guest-cid={spec.transport.guest_cid}"]
    for i in range(spec.hotplug_slots):
        # One root port per hot-added device (PCIe has one device per port). Before the
        # devices: a cold-plugged one names its port as its bus, which must exist by then.
        argv += ["-device", f"pcie-root-port,id={HOTPLUG_PORT}{i},chassis={i + 1}"]
    ports = iter(_cold_ports(spec))
    for i, disk in enumerate(spec.disks):
        device = disk_device(m, disk)
        if i == 0 and isinstance(spec.boot, Firmware):
            device["bootindex"] = 0
        if spec.unpluggable_devices:
            device["bus"] = next(ports)
        argv += ["-blockdev", json.dumps(disk_node(disk)),
                 "-device", _option(device, "driver")]
    for i, nic in enumerate(spec.nics):
        argv += nic_args(nic, m, i, next(ports) if spec.unpluggable_devices else "")
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
