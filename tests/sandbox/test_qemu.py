"""Unit tests of the QEMU command-line builder (no QEMU is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.errors import InvalidArgument
from criserver.sandbox.qemu import (
    ExtraDisk,
    GuestMemory,
    Machine,
    SerialTransport,
    Share,
    TapNic,
    VMSpec,
    VsockTransport,
    build_command,
    kernel_cmdline,
)


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "vm_id": "pod1",
        "state_dir": Path("/run/c/pod1"),
        "kernel": Path("/a/vmlinux"),
        "initramfs": Path("/a/initramfs.cpio"),
        "root_disk": Path("/a/root.erofs"),
        "transport": SerialTransport(Path("/run/c/pod1/agent.sock")),
        "tsc_khz": 2596130,
    }
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_serial_defaults() -> None:
    argv = build_command(spec())
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-machine") == ["microvm,acpi=on"]
    assert opt(argv, "-accel") == ["tcg"]
    assert opt(argv, "-cpu") == ["qemu64,+rdrand"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-daemonize"):
        assert flag in argv
    assert opt(argv, "-pidfile") == ["/run/c/pod1/qemu.pid"]
    assert opt(argv, "-qmp") == ["unix:/run/c/pod1/qmp.sock,server=on,wait=off"]
    devices = opt(argv, "-device")
    assert "virtio-blk-device,drive=root,serial=criserver-root" in devices
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=criserver.agent" in devices
    assert "pvpanic" in devices
    assert "socket,id=agent,path=/run/c/pod1/agent.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert "file=/a/root.erofs,if=none,id=root,format=raw,readonly=on" in opt(argv, "-drive")
    assert opt(argv, "-chardev")[0] == "file,id=console,path=/run/c/pod1/vm.log,append=on"


def test_cmdline_carries_tsc_transport_and_settings() -> None:
    line = kernel_cmdline(spec(agent_settings={"log_level": "debug"}, module_groups=("overlay",)))
    words = line.split()
    assert "tsc_early_khz=2596130" in words
    assert "console=ttyS0" in words and "cryptomgr.notests" in words and "panic=-1" in words
    assert "tsc=reliable" in words
    assert "criserver.bus=mmio" in words and "criserver.transport=serial" in words
    assert "criserver.modules=overlay,pvpanic" in words
    assert "criserver.log_level=debug" in words


def test_no_tsc_when_unknown() -> None:
    assert "tsc_early_khz" not in kernel_cmdline(spec(tsc_khz=None))


def test_q35_uses_pci_devices() -> None:
    argv = build_command(spec(machine=Machine.Q35))
    assert opt(argv, "-machine") == ["q35"]
    devices = opt(argv, "-device")
    assert any(d.startswith("virtio-blk-pci,") for d in devices)
    assert any(d.startswith("virtio-serial-pci,") for d in devices)
    assert "criserver.bus=pci" in kernel_cmdline(spec(machine=Machine.Q35)).split()


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
    words = kernel_cmdline(spec(free_page_reporting=True, page_reporting_order=3)).split()
    assert "criserver.pr_order=3" in words
    assert any(w.startswith("criserver.modules=") and "balloon" in w for w in words)
    # The translation cache is TCG's alone; q35 gets the PCI balloon.
    assert opt(build_command(spec(accel="kvm", tcg_tb_size_mib=64)), "-accel") == ["kvm"]
    q35 = build_command(spec(machine=Machine.Q35, free_page_reporting=True))
    assert "virtio-balloon-pci,free-page-reporting=on" in opt(q35, "-device")
    assert not any("balloon" in d for d in opt(build_command(spec()), "-device"))


def test_nics_and_extra_disks() -> None:
    s = spec(
        nics=(TapNic(fd=7, mac="02:00:00:00:00:01", mtu=1450),),
        disks=(ExtraDisk(path=Path("/img/layer.erofs"), serial="layer0"),),
    )
    argv = build_command(s)
    assert "tap,id=net0,fd=7,vhost=off" in opt(argv, "-netdev")
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1450" in opt(argv,
                                                                                  "-device")
    assert "file=/img/layer.erofs,if=none,id=disk0,format=raw,readonly=on" in opt(argv, "-drive")
    assert "virtio-blk-device,drive=disk0,serial=layer0" in opt(argv, "-device")
    assert "criserver.modules=net,pvpanic" in kernel_cmdline(s).split()


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
    assert "criserver.modules=9p,pvpanic" in kernel_cmdline(s).split()
    q35 = build_command(spec(machine=Machine.Q35, shares=(Share("t", Path("/x")),)))
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=t" in opt(q35, "-device")


@pytest.mark.parametrize(
    "bad",
    [
        {"state_dir": Path("/" + "x" * 120)},
        {"nics": (TapNic(fd=7, mac="not-a-mac"),)},
        {"root_disk": Path("/a,b/root.erofs")},
        {"agent_settings": {"log level": "x"}},
        {"agent_settings": {"k": "has space"}},
        {"memory_mib": 16},
        {"tcg_tb_size_mib": -1},
        {"page_reporting_order": 11},
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
    assert opt(template, "-machine") == ["microvm,acpi=on,memory-backend=ram"]
    assert opt(template, "-object") == [
        "memory-backend-file,id=ram,size=320M,mem-path=/t/memory,share=on"]
    assert "-incoming" not in template
    clone = build_command(spec(memory_mib=320, incoming=True,
                               memory_file=GuestMemory(Path("/t/memory"), shared=False)))
    assert opt(clone, "-object") == [
        "memory-backend-file,id=ram,size=320M,mem-path=/t/memory,share=off"]
    assert opt(clone, "-incoming") == ["defer"]
    plain = build_command(spec())
    assert "-object" not in plain and opt(plain, "-machine") == ["microvm,acpi=on"]
