"""Unit tests of the QEMU command-line builder (no QEMU is started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from criserver.errors import InvalidArgument
from criserver.vm.qemu import (
    DirectKernel,
    Disk,
    Firmware,
    FwCfgFile,
    GuestMemory,
    Machine,
    RebootPolicy,
    SerialTransport,
    Share,
    TapNic,
    VMSpec,
    VsockTransport,
    build_command,
)

ROOT = Disk("root", Path("/a/root.erofs"), serial="criserver-root")


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "vm_id": "pod1",
        "state_dir": Path("/run/c/pod1"),
        "boot": DirectKernel(Path("/a/vmlinux"), Path("/a/initramfs.cpio"), "console=ttyS0"),
        "disks": (ROOT,),
        "transport": SerialTransport(Path("/run/c/pod1/agent.sock")),
    }
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_serial_defaults() -> None:
    argv = build_command(spec())
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-machine") == ["microvm,acpi=on,pit=off,pic=off"]
    assert opt(argv, "-accel") == ["tcg"]
    assert opt(argv, "-cpu") == ["qemu64,+rdrand,+arat"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-daemonize"):
        assert flag in argv
    assert opt(argv, "-pidfile") == ["/run/c/pod1/qemu.pid"]
    assert opt(argv, "-qmp") == ["unix:/run/c/pod1/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-kernel") == ["/a/vmlinux"] and opt(argv, "-initrd") == [
        "/a/initramfs.cpio"]
    assert opt(argv, "-append") == ["console=ttyS0"]
    assert opt(argv, "-action") == ["reboot=shutdown,panic=shutdown"]
    devices = opt(argv, "-device")
    assert "virtio-blk-device,id=root,drive=root-node,serial=criserver-root" in devices
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=agent" in devices
    assert "pvpanic" in devices
    assert "socket,id=agent,path=/run/c/pod1/agent.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert json.loads(opt(argv, "-blockdev")[0]) == {
        "driver": "raw", "node-name": "root-node", "read-only": True,
        "file": {"driver": "file", "filename": "/a/root.erofs", "read-only": True}}
    assert opt(argv, "-chardev")[0] == "file,id=console,path=/run/c/pod1/vm.log,append=on"


def test_a_vm_without_agent_or_initramfs() -> None:
    argv = build_command(spec(transport=None, boot=DirectKernel(Path("/k"), None, "quiet")))
    assert "-initrd" not in argv
    assert not any("virtserialport" in d or "vsock" in d for d in opt(argv, "-device"))


def test_firmware_boot_from_the_first_disk_and_reset_on_reboot() -> None:
    disk = Disk("os", Path("/m/os.qcow2"), read_only=False, format="qcow2")
    argv = build_command(spec(boot=Firmware(), disks=(disk,), reboot=RebootPolicy.RESET,
                              machine=Machine.Q35, transport=None))
    assert "-kernel" not in argv and "-bios" not in argv
    assert "virtio-blk-pci,id=os,drive=os-node,bootindex=0" in opt(argv, "-device")
    assert json.loads(opt(argv, "-blockdev")[0])["driver"] == "qcow2"
    assert opt(argv, "-action") == ["reboot=reset,panic=shutdown"]
    own = build_command(spec(boot=Firmware(Path("/fw/OVMF.fd")), disks=(disk,)))
    assert opt(own, "-bios") == ["/fw/OVMF.fd"]


def test_hotplug_slots_are_root_ports() -> None:
    argv = build_command(spec(machine=Machine.Q35, hotplug_slots=2))
    ports = [d for d in opt(argv, "-device") if d.startswith("pcie-root-port")]
    assert ports == ["pcie-root-port,id=hotplug0,chassis=1",
                     "pcie-root-port,id=hotplug1,chassis=2"]


def test_q35_uses_pci_devices() -> None:
    argv = build_command(spec(machine=Machine.Q35))
    assert opt(argv, "-machine") == ["q35"]
    devices = opt(argv, "-device")
    assert any(d.startswith("virtio-blk-pci,") for d in devices)
    assert any(d.startswith("virtio-serial-pci,") for d in devices)


def test_vsock_transport() -> None:
    argv = build_command(spec(transport=VsockTransport(guest_cid=42)))
    assert "vhost-vsock-device,guest-cid=42" in opt(argv, "-device")
    assert not any("virtserialport" in d for d in opt(argv, "-device"))
    q35 = build_command(spec(transport=VsockTransport(guest_cid=42), machine=Machine.Q35))
    assert "vhost-vsock-pci,guest-cid=42" in opt(q35, "-device")
    with pytest.raises(InvalidArgument):
        build_command(spec(transport=VsockTransport(guest_cid=2)))


def test_kvm_uses_host_cpu() -> None:
    assert opt(build_command(spec(accel="kvm")), "-cpu") == ["host"]


def test_host_memory_options() -> None:
    argv = build_command(spec(tcg_tb_size_mib=64, free_page_reporting=True))
    assert opt(argv, "-accel") == ["tcg,tb-size=64"]
    assert "virtio-balloon-device,free-page-reporting=on" in opt(argv, "-device")
    # The translation cache is TCG's alone; q35 gets the PCI balloon.
    assert opt(build_command(spec(accel="kvm", tcg_tb_size_mib=64)), "-accel") == ["kvm"]
    q35 = build_command(spec(machine=Machine.Q35, free_page_reporting=True))
    assert "virtio-balloon-pci,free-page-reporting=on" in opt(q35, "-device")
    assert not any("balloon" in d for d in opt(build_command(spec()), "-device"))


def test_nics_and_extra_disks() -> None:
    s = spec(
        nics=(TapNic(fd=7, mac="02:00:00:00:00:01", mtu=1450),),
        disks=(ROOT, Disk("layer0", Path("/img/layer.erofs"), serial="layer0")),
    )
    argv = build_command(s)
    assert "tap,id=net0-netdev,fd=7,vhost=off" in opt(argv, "-netdev")
    assert ("virtio-net-device,id=net0,netdev=net0-netdev,mac=02:00:00:00:00:01,host_mtu=1450"
            in opt(argv, "-device"))
    assert "virtio-blk-device,id=layer0,drive=layer0-node,serial=layer0" in opt(argv, "-device")
    assert len(opt(argv, "-blockdev")) == 2


def test_9p_shares() -> None:
    s = spec(
        shares=(
            Share("criserver.images", Path("/var/lib/c/images")),
            Share("criserver.shared", Path("/var/lib/c/shared"), read_only=False),
        )
    )
    argv = build_command(s)
    assert opt(argv, "-fsdev") == [
        "local,id=fs0,path=/var/lib/c/images,security_model=none,multidevs=remap,readonly=on",
        "local,id=fs1,path=/var/lib/c/shared,security_model=none,multidevs=remap",
    ]
    assert "virtio-9p-device,fsdev=fs0,mount_tag=criserver.images" in opt(argv, "-device")
    q35 = build_command(spec(machine=Machine.Q35, shares=(Share("t", Path("/x")),)))
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=t" in opt(q35, "-device")


@pytest.mark.parametrize(
    "bad",
    [
        {"state_dir": Path("/" + "x" * 120)},
        {"nics": (TapNic(fd=7, mac="not-a-mac"),)},
        {"disks": (Disk("root", Path("/a,b/root.erofs")),)},
        {"disks": (Disk("bad id", Path("/a/root.erofs")),)},
        {"disks": (ROOT, ROOT)},
        {"boot": Firmware(), "disks": ()},
        {"hotplug_slots": 1},  # microvm has no PCIe
        {"memory_mib": 16},
        {"tcg_tb_size_mib": -1},
        {"shares": (Share("bad tag", Path("/x")),)},
        {"memory_file": GuestMemory(Path("/t,x/memory"), shared=False)},
        # A clone's reported page would be punched out of the template file.
        {"memory_file": GuestMemory(Path("/t/memory"), shared=False),
         "free_page_reporting": True},
    ],
)
def test_rejects_bad_specs(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match="pod1"):
        build_command(spec(**bad))


def test_guest_memory_file_and_incoming() -> None:
    template = build_command(spec(memory_mib=320,
                                  memory_file=GuestMemory(Path("/t/memory"), shared=True)))
    assert opt(template, "-machine") == ["microvm,acpi=on,pit=off,pic=off,memory-backend=ram"]
    assert opt(template, "-object") == [
        "memory-backend-file,id=ram,size=320M,mem-path=/t/memory,share=on"]
    assert "-incoming" not in template
    clone = build_command(spec(memory_mib=320, incoming=True,
                               memory_file=GuestMemory(Path("/t/memory"), shared=False)))
    assert opt(clone, "-object") == [
        "memory-backend-file,id=ram,size=320M,mem-path=/t/memory,share=off"]
    assert opt(clone, "-incoming") == ["defer"]
    plain = build_command(spec())
    assert "-object" not in plain and opt(plain, "-machine") == ["microvm,acpi=on,pit=off,pic=off"]


def test_fw_cfg_files_and_an_interactive_console() -> None:
    argv = build_command(spec(
        machine=Machine.Q35, boot=Firmware(), transport=None,
        fw_cfg=(FwCfgFile("opt/com.coreos/config", Path("/m/ignition.json")),),
        interactive_console=True,
    ))
    assert argv[argv.index("-fw_cfg") + 1] == "name=opt/com.coreos/config,file=/m/ignition.json"
    chardev = argv[argv.index("-serial") - 1]
    assert chardev == ("socket,id=console,path=/run/c/pod1/console.sock,server=on,wait=off,"
                       "logfile=/run/c/pod1/vm.log,logappend=on")


@pytest.mark.parametrize("name", ["etc/boot-menu-wait", "opt/", "opt/a,b", "opt/" + "x" * 52])
def test_rejects_fw_cfg_names_qemu_reserves_or_misparses(name: str) -> None:
    with pytest.raises(InvalidArgument, match="fw_cfg"):
        build_command(spec(fw_cfg=(FwCfgFile(name, Path("/m/f")),)))


def test_unpluggable_devices_start_in_hotplug_ports() -> None:
    argv = build_command(spec(
        machine=Machine.Q35, boot=Firmware(), transport=None, hotplug_slots=4,
        unpluggable_devices=True, nics=(TapNic(7, "02:00:00:00:00:01", id="eth0"),),
    ))
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert any(d.startswith("virtio-blk-pci,id=root,") and "bootindex=0" in d
               and d.endswith("bus=hotplug0") for d in devices)
    assert any(d.startswith("virtio-net-pci,id=eth0,") and d.endswith("bus=hotplug1")
               for d in devices)
    # QEMU resolves a device's bus when it reads the device: the ports come first.
    first_port = devices.index("pcie-root-port,id=hotplug0,chassis=1")
    assert all(i > first_port for i, d in enumerate(devices) if "bus=hotplug" in d)
    with pytest.raises(InvalidArgument, match="hotplug slots"):
        build_command(spec(machine=Machine.Q35, boot=Firmware(), transport=None,
                           hotplug_slots=0, unpluggable_devices=True))
