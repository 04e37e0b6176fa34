"""What a runc pod's container specs may carry (`oci_spec.SpecPolicy`): everything the CRI asks
for, the node's namespaces included (these pods are trusted by routing, criserver/runtime/
routing.py), except the labels of a security module the host does not run."""

from __future__ import annotations

import os

from criserver.runtime.oci_spec import SpecPolicy

APPARMOR_ENABLED = "/sys/module/apparmor/parameters/enabled"
SELINUX_FS = "/sys/fs/selinux"


def _apparmor_enabled(path: str = APPARMOR_ENABLED) -> bool:
    try:
        with open(path) as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def host_policy(*, apparmor: bool | None = None, selinux: bool | None = None) -> SpecPolicy:
    """The policy for this host: AppArmor profiles and SELinux labels are kept only where the
    kernel enforces them (runc fails on a profile it cannot apply). Reads /sys: call it once,
    at backend start."""
    if apparmor is None:
        apparmor = _apparmor_enabled()
    if selinux is None:
        selinux = os.path.isdir(SELINUX_FS) and os.path.exists(f"{SELINUX_FS}/enforce")
    return SpecPolicy(
        apparmor_dropped="" if apparmor else "AppArmor is not enabled on this host",
        selinux_dropped="" if selinux else "SELinux is not enabled on this host",
        # runc runs with the cgroupfs driver (the systemd one needs systemd on D-Bus).
        cgroup_driver="cgroupfs",
    )
