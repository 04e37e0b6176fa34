"""A host pod's infra container: PID 1 of the pod's shared PID namespace.

A PID namespace cannot be pinned like a netns: once its init exits no process can enter it
(pid_namespaces(7)). Containers in pid mode POD (the CRI default, critest's, and
shareProcessNamespace pods) join this one. Its program is `ctrmon pause` (reaps what is re-parented
to it, exits on SIGTERM), bound read-only into an empty root: no image, nothing to pull.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from criserver.runtime.oci_spec import OCI_VERSION

PAUSE = "/pause"


def infra_spec(*, monitor_binary: str, rootfs: Path, cgroups_path: str,
               namespaces: dict[str, str]) -> dict[str, Any]:
    """The OCI spec of the infra container. `namespaces`: kind -> path to join, or "" for a new
    one ("pid" is always new)."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 65535, "gid": 65535},
            "args": [PAUSE, "pause"],
            "env": ["PATH=/"],
            "cwd": "/",
            # Only what reaping children and waiting for a signal needs: nothing.
            "capabilities": {kind: [] for kind in
                             ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "noNewPrivileges": True,
            # No oomScoreAdj: it keeps its monitor's -999 where the host allows lowering it
            # (containerd gives pause -998), and runc fails if it may not set a value.
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=64k"]},
            {"destination": PAUSE, "type": "bind", "source": monitor_binary,
             "options": ["rbind", "rprivate", "ro", "nosuid", "nodev"]},
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": "pid"}, {"type": "mount"}, *(
                {"type": kind, **({"path": path} if path else {})}
                for kind, path in namespaces.items() if kind not in ("pid", "mount"))],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"],
        },
    }
