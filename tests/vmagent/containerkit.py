"""Test helpers for containers in the guest: a busybox root filesystem packed as an EROFS image
file (what the image service makes), and OCI runtime specs shaped like the host generates them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from criserver.backends.microvm.guest import GuestBoot, pod_guest_spec
from criserver.vm.accel import read_tsc_khz
from criserver.vm.assets import GuestAssets
from criserver.vm.qemu import SerialTransport, Share, VMSpec

BUSYBOX = "/bin/busybox"


def busybox_rootfs(root: Path) -> Path:
    """A minimal image root: busybox with its applets, /etc/passwd and /etc/group."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/app", "data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            (root / "bin" / a).symlink_to("busybox")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    (root / "tmp").chmod(0o1777)
    return root


def make_erofs(root: Path, out_dir: Path) -> str:
    """Pack `root` into `<out_dir>/<sha256>.erofs`; returns the file name."""
    tmp = out_dir / "image.erofs.tmp"
    subprocess.run(["mkfs.erofs", "-T0", "--all-root", "-x", "-1", str(tmp), str(root)],
                   check=True, capture_output=True)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"{digest}.erofs"
    tmp.rename(out_dir / name)
    return name


def container_vm_spec(vm_id: str, work: Path, assets: GuestAssets,
                      shared: Path | None = None,
                      settings: Mapping[str, str] | None = None) -> VMSpec:
    """A VM that can run containers (overlay, 9p, loop module groups) with `<work>/images`
    exported as the image share and, if given, `shared` as the volumes share; `settings` for
    the agent."""
    shares = [Share("criserver.images", work / "images", read_only=True)]
    if shared is not None:
        shares.append(Share("criserver.shared", shared, read_only=False))
    boot = GuestBoot(tsc_khz=read_tsc_khz(), module_groups=("overlay", "9p", "loop"),
                     settings=settings or {})
    return pod_guest_spec(vm_id, work, assets, SerialTransport(work / "agent.sock"), boot,
                          pvpanic=False, shares=tuple(shares))


def oci_spec(args: list[str], *, env: list[str] | None = None,
             mounts: list[dict[str, Any]] | None = None,
             memory_limit: int | None = None) -> bytes:
    """A spec like the host sends: runc's defaults plus CRI-ish capabilities."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
            "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit:
        resources["memory"] = {"limit": memory_limit, "swap": memory_limit}
    spec = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": env or ["PATH=/bin", "TERM=xterm"], "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "ignored",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            *(mounts or []),
        ],
        "linux": {
            "resources": resources,
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "cgroupsPath": "/kubepods/besteffort/podX/ctr",
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"],
        },
    }
    return json.dumps(spec).encode()
