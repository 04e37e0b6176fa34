"""The pod guest's VM spec: the kernel command line its /init and agent read (no QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.backends.microvm.guest import GuestBoot, as_template, pod_guest_spec
from criserver.errors import InvalidArgument
from criserver.vm.assets import GuestAssets
from criserver.vm.qemu import (
    DirectKernel,
    Machine,
    SerialTransport,
    Share,
    TapNic,
    VMSpec,
    VsockTransport,
)
from vmagent.contract import AGENT_PORT_NAME

ASSETS = GuestAssets(Path("/a"), {"kernel": "vmlinux", "initramfs": "initramfs.cpio",
                                  "root": "root.erofs", "root_serial": "criserver-root"})


def spec(boot: GuestBoot | None = None, **kw: object) -> VMSpec:
    return pod_guest_spec("pod1", Path("/run/c/pod1"), ASSETS,
                          SerialTransport(Path("/run/c/pod1/agent.sock")),
                          boot or GuestBoot(tsc_khz=2596130),
                          **kw)  # type: ignore[arg-type]


def words(s: VMSpec) -> list[str]:
    assert isinstance(s.boot, DirectKernel)
    return s.boot.cmdline.split()


def test_boots_the_assets_with_their_root_disk() -> None:
    s = spec()
    assert s.boot == DirectKernel(Path("/a/vmlinux"), Path("/a/initramfs.cpio"), s.boot.cmdline)
    assert [(d.id, d.path, d.serial) for d in s.disks] == [
        ("root", Path("/a/root.erofs"), "criserver-root")]


def test_cmdline_carries_tsc_transport_and_settings() -> None:
    w = words(spec(GuestBoot(tsc_khz=2596130, settings={"log_level": "debug"},
                             module_groups=("overlay",))))
    assert "tsc_early_khz=2596130" in w
    assert "console=ttyS0" in w and "cryptomgr.notests" in w and "panic=-1" in w
    assert "tsc=reliable" in w
    assert "criserver.bus=mmio" in w and "criserver.transport=serial" in w
    assert "criserver.modules=overlay,pvpanic" in w
    assert "criserver.log_level=debug" in w


def test_no_tsc_when_unknown() -> None:
    assert not any(w.startswith("tsc_early_khz") for w in words(spec(GuestBoot())))


def test_bus_and_transport_follow_the_vm() -> None:
    q35 = pod_guest_spec("pod1", Path("/run/c/pod1"), ASSETS, VsockTransport(42),
                         machine=Machine.Q35)
    assert "criserver.bus=pci" in words(q35) and "criserver.transport=vsock" in words(q35)


def test_devices_imply_module_groups() -> None:
    nic = spec(nics=(TapNic(fd=7, mac="02:00:00:00:00:01"),))
    assert "criserver.modules=net,pvpanic" in words(nic)
    share = spec(shares=(Share("criserver.images", Path("/i")),))
    assert "criserver.modules=9p,pvpanic" in words(share)
    balloon = spec(GuestBoot(page_reporting_order=3), free_page_reporting=True)
    assert "criserver.pr_order=3" in words(balloon)
    assert any(w.startswith("criserver.modules=") and "balloon" in w for w in words(balloon))


def test_template_boot_adds_the_setting() -> None:
    assert "criserver.template=1" in words(as_template(spec()))
    assert "criserver.template=1" not in words(spec())


@pytest.mark.parametrize("boot", [
    GuestBoot(settings={"log level": "x"}),
    GuestBoot(settings={"k": "has space"}),
    GuestBoot(page_reporting_order=11),
])
def test_rejects_bad_settings(boot: GuestBoot) -> None:
    with pytest.raises(InvalidArgument, match="pod1"):
        spec(boot, free_page_reporting=True)


def test_the_agent_port_has_the_contract_name() -> None:
    transport = spec().transport
    assert isinstance(transport, SerialTransport) and transport.port_name == AGENT_PORT_NAME
