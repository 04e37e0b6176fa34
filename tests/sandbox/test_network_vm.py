"""End to end under TCG: a real micro-VM on the pod's tap (fd passed to QEMU, the CNI MAC on its
virtio-net), the guest configured with guest_ip_commands, reachable at the pod IP from another
pod, and reaching the gateway itself. The guest is a minimal busybox initramfs built here, so
this proves the network path without the agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
from pathlib import Path

import pytest

from criserver.sandbox import accel, netns, tap
from criserver.sandbox.cni import PodRef
from criserver.sandbox.network import guest_ip_commands
from tests.sandbox.test_network_support import NetEnv, needs_root_cni, net_env, ping, read, sh

_ = net_env  # a fixture: used by name

KERNEL_VERSION = "6.1.0-56-cloud-amd64"
KERNEL = Path(f"/boot/vmlinuz-{KERNEL_VERSION}")
MODULES = ["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net"]
BUSYBOX = Path("/bin/busybox")

pytestmark = [
    pytest.mark.vm,
    needs_root_cni,
    pytest.mark.skipif(
        not KERNEL.exists() or not shutil.which("qemu-system-x86_64") or not shutil.which("cpio"),
        reason="needs the cloud kernel, QEMU, cpio",
    ),
]


def _find_module(name: str) -> Path:
    for dirpath, _, files in os.walk(f"/lib/modules/{KERNEL_VERSION}/kernel"):
        if f"{name}.ko" in files:
            return Path(dirpath) / f"{name}.ko"
    raise FileNotFoundError(name)


def _init_script(commands: list[list[str]], gateway: str) -> str:
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox --install -s /bin",
        "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev",
        *[f"insmod /lib/modules/{m}.ko" for m in MODULES],
        *[shlex.join(c) + " || echo CMD-FAILED" for c in commands],
        "echo NET-CONFIGURED",
        f"if ping -c 3 -W 5 {gateway} >/dev/null; then echo GUEST-PING-OK; "
        "else echo GUEST-PING-FAILED; fi",
        "ip addr show dev eth0",
        "sleep 3600",
    ]
    return "\n".join(lines) + "\n"


async def _initramfs(stage: Path, init: str, out: Path) -> None:
    for sub in ("bin", "proc", "sys", "dev", "lib/modules"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, stage / "bin" / "busybox")
    for name in MODULES:
        shutil.copy(_find_module(name), stage / "lib" / "modules" / f"{name}.ko")
    (stage / "init").write_text(init)
    (stage / "init").chmod(0o755)
    await sh(
        "sh",
        "-c",
        f"cd {shlex.quote(str(stage))} && find . | cpio -o -H newc --quiet "
        f"> {shlex.quote(str(out))}",
    )


async def _wait_for(
    path: Path, marker: str, qemu: asyncio.subprocess.Process, timeout: float
) -> str:
    text = ""
    for _ in range(int(timeout * 10)):
        text = read(path) if path.exists() else ""
        if marker in text or qemu.returncode is not None:
            break
        await asyncio.sleep(0.1)
    return text


async def test_vm_gets_the_pod_ip_through_the_tap(net_env: NetEnv, tmp_path: Path) -> None:
    net = net_env.pod_network()
    info = await net.setup("vmpod", "web", "default", "uid-vm")
    client = net_env.netns_dir / "client"
    await netns.create(client)
    await net.cni.add(PodRef("client", "client", "default", "uid-c"), str(client))
    gateway = info.guest.routes[0].gateway
    assert gateway is not None

    initrd = tmp_path / "initrd.cpio"
    await _initramfs(
        tmp_path / "stage", _init_script(guest_ip_commands(info.guest), gateway), initrd
    )
    console = tmp_path / "console.log"
    tsc = accel.read_tsc_khz()
    append = "console=ttyS0 panic=-1 cryptomgr.notests" + (f" tsc_early_khz={tsc}" if tsc else "")
    fd = await tap.open_tap_fd(Path(info.netns))
    try:
        qemu = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64",
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{console}",
            "-kernel",
            str(KERNEL),
            "-initrd",
            str(initrd),
            "-append",
            append,
            *info.tap.qemu_netdev_args(fd),
            pass_fds=(fd,),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    finally:
        os.close(fd)
    try:
        text = await _wait_for(console, "GUEST-PING-", qemu, timeout=120)
        assert "NET-CONFIGURED" in text and "CMD-FAILED" not in text, text[-3000:]
        # The guest reached its gateway (the bridge) with the pod IP and the CNI MAC...
        assert "GUEST-PING-OK" in text, text[-3000:]
        # ...and another pod reaches the guest at the pod IP.
        assert await ping(client, info.ips[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            qemu.kill()
        await qemu.wait()
    await net.cni.delete("client", str(client))
    await netns.remove(client)
    await net.teardown("vmpod")
    assert net_env.allocations() == [] and await net_env.our_rules() == []
