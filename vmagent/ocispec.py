"""Completing the host's OCI runtime spec with what only the guest knows: the rootfs path, the
resolved user, the guest cgroup, the pod's files and /dev/shm, the pod's namespaces, and the
guest's devices for privileged containers.
Pure functions on the spec dict (unit-tested on the host); the caller gathers the inputs.
"""

from __future__ import annotations

import copy
import os
import stat
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.users import ResolvedUser

CGROUP_PARENT = "/criserver"
# Set by the host on a privileged container's spec: it gets every device node of the guest.
GUEST_DEVICES_ANNOTATION = "io.criserver.guest-devices"
# What runc skips when it lists a host's devices (libcontainer/devices): not device nodes of
# their own, or mounted separately.
_SKIPPED_DEV_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PodContext:
    """Pod-level facts a container spec points at."""

    def __init__(self, *, hosts: str = "", resolv_conf: str = "", hostname: str = "",
                 shm: str = "", ipc_uts_pid: int = 0, pid_ns_pid: int = 0,
                 userns_pid: int = 0, outside_pod: bool = False) -> None:
        self.hosts = hosts  # guest paths of the pod's files ("" when the pod has none)
        self.resolv_conf = resolv_conf
        self.hostname = hostname
        self.shm = shm
        self.ipc_uts_pid = ipc_uts_pid  # whose IPC and UTS namespaces the pod's containers join
        self.pid_ns_pid = pid_ns_pid  # PID 1 of the pod's PID namespace (PID_POD only)
        self.userns_pid = userns_pid  # holder of the pod's user namespace (0: none)
        self.outside_pod = outside_pod  # a container of no pod yet: none of the pod's files


def load_spec(raw: bytes, container_id: str) -> dict[str, Any]:
    import json

    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"container {container_id}: OCI spec is not JSON: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"container {container_id}: OCI spec lacks a process")
    if not spec["process"].get("args"):
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"container {container_id}: OCI spec has no process.args")
    return spec


def wants_guest_devices(spec: dict[str, Any]) -> bool:
    return (spec.get("annotations") or {}).get(GUEST_DEVICES_ANNOTATION) == "true"


def guest_devices(dev_dir: str = "/dev") -> list[dict[str, Any]]:
    """Every device node under the guest's /dev as `linux.devices` entries: what containerd
    gives a privileged container on a host (its HostDevices). Blocking: call it in a thread."""
    devices = []
    for dirpath, dirnames, filenames in os.walk(dev_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DEV_DIRS)
        for name in sorted(filenames):
            if name == "console":  # runc sets /dev/console up itself
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:  # gone meanwhile
                continue
            if stat.S_ISCHR(st.st_mode):
                kind = "c"
            elif stat.S_ISBLK(st.st_mode):
                kind = "b"
            else:
                continue
            devices.append({"path": path, "type": kind, "major": os.major(st.st_rdev),
                            "minor": os.minor(st.st_rdev), "fileMode": stat.S_IMODE(st.st_mode),
                            "uid": st.st_uid, "gid": st.st_gid})
    return devices


def _pod_mounts(pod: PodContext, read_only_root: bool) -> list[dict[str, Any]]:
    rw = "ro" if read_only_root else "rw"
    mounts = []
    for dest, source in (("/etc/hosts", pod.hosts), ("/etc/resolv.conf", pod.resolv_conf),
                         ("/etc/hostname", pod.hostname)):
        if source:
            mounts.append({"destination": dest, "type": "bind", "source": source,
                           "options": ["rbind", "rprivate", rw]})
    if pod.shm:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": pod.shm,
                       "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec"]})
    return mounts


def _namespaces(spec_ns: list[dict[str, Any]], pod: PodContext,
                pid_mode: int) -> list[dict[str, Any]]:
    """pid_mode: 0 per container, 1 the pod's, 2 the guest's (agent.proto PidNamespace)."""
    out: list[dict[str, Any]] = []
    for ns in spec_ns:
        kind = ns.get("type")
        # The VM is the pod: its network namespace is the pod's, so containers stay in it.
        if kind in ("network", "ipc", "uts", "pid", "user"):
            continue
        out.append(dict(ns))
    if pod.userns_pid:
        out.append({"type": "user", "path": f"/proc/{pod.userns_pid}/ns/user"})
    if pod.ipc_uts_pid:
        out.append({"type": "ipc", "path": f"/proc/{pod.ipc_uts_pid}/ns/ipc"})
        out.append({"type": "uts", "path": f"/proc/{pod.ipc_uts_pid}/ns/uts"})
    if pid_mode == 0:
        out.append({"type": "pid"})
    elif pid_mode == 1:
        if not pod.pid_ns_pid:
            raise GRPCError(Status.INTERNAL, "pod PID namespace requested but not created")
        out.append({"type": "pid", "path": f"/proc/{pod.pid_ns_pid}/ns/pid"})
    if not any(ns.get("type") == "mount" for ns in out):
        out.append({"type": "mount"})
    return out


def _userns_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mounts a container in the pod's user namespace can make: a new sysfs needs a network
    namespace of that user namespace, and containers stay in the VM's, so /sys is the guest's
    (read-only unless the spec says rw), bound as runc does for rootless containers."""
    out = []
    for m in mounts:
        if m.get("type") == "sysfs":
            opts = [o for o in m.get("options") or [] if o in ("nosuid", "noexec", "nodev")]
            mode = "rw" if "rw" in (m.get("options") or []) else "ro"
            m = {"destination": m.get("destination", "/sys"), "type": "bind", "source": "/sys",
                 "options": ["rbind", "rprivate", *opts, mode]}
        out.append(m)
    return out


def guest_hugepage_sizes(root: str = "/sys/kernel/mm/hugepages") -> frozenset[str]:
    """The huge page sizes of this guest's kernel, named as the CRI and runc name them ("2MB",
    "1GB"): the guest's hugetlb cgroup has files for these sizes only."""
    try:
        names = os.listdir(root)
    except OSError:
        return frozenset()
    sizes = set()
    for name in names:  # hugepages-2048kB
        kib = name.removeprefix("hugepages-").removesuffix("kB")
        if kib.isdigit():
            sizes.add(_page_size_name(int(kib) * 1024))
    return frozenset(sizes)


def _page_size_name(size: int) -> str:
    """runc's name of a page size (go-units CustomSize "%g%s", base 1024): 2 MiB -> "2MB"."""
    units = ["B", "KB", "MB", "GB", "TB", "PB"]
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{value:g}{units[unit]}"


def set_process_user(process: dict[str, Any], user: ResolvedUser | None) -> None:
    """The resolved user in an OCI `process`, with the environment a login would give: a
    default PATH, and HOME from the user's passwd entry unless the spec sets them."""
    env = [e for e in process.get("env") or [] if isinstance(e, str)]
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, _DEFAULT_PATH)
    if user is not None:
        process["user"] = {"uid": user.uid, "gid": user.gid,
                           "additionalGids": user.additional_gids}
        if not any(e.startswith("HOME=") for e in env):
            env.append(f"HOME={user.home}")
    process.setdefault("user", {"uid": 0, "gid": 0})
    process["env"] = env
    process.setdefault("cwd", "/")


def complete_spec(spec: dict[str, Any], *, container_id: str, rootfs: str, pod: PodContext,
                  pid_mode: int = 0, user: ResolvedUser | None = None,
                  terminal: bool = False,
                  devices: list[dict[str, Any]] | None = None,
                  hugepage_sizes: frozenset[str] | None = None) -> dict[str, Any]:
    """A copy of `spec` ready for runc in this guest (`terminal`: runc makes a pty for the
    process and sends its master to the --console-socket; `devices`: `guest_devices()` for a
    spec that `wants_guest_devices`; `hugepage_sizes`: `guest_hugepage_sizes()`, the limits
    on other sizes are dropped)."""
    spec = copy.deepcopy(spec)
    (spec.get("annotations") or {}).pop(GUEST_DEVICES_ANNOTATION, None)
    root = spec.get("root") or {}
    read_only = bool(root.get("readonly", False))
    spec["root"] = {"path": rootfs, "readonly": read_only}
    process = spec["process"]
    process["terminal"] = terminal
    set_process_user(process, user)
    replaced = {"/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/dev/shm"}
    pod_mounts = _pod_mounts(pod, read_only)
    ours = {m["destination"] for m in pod_mounts}
    # A container of no pod has no pod files to take their place: the host's go all the same.
    spec["mounts"] = [m for m in spec.get("mounts") or []
                      if not (m.get("destination") in replaced
                              and (m.get("destination") in ours or pod.outside_pod))
                      ] + pod_mounts
    if pod.ipc_uts_pid:
        # The pod's UTS namespace already carries the pod hostname (SetupSandbox); runc would
        # set it again from the spec, for every container of the pod.
        spec.pop("hostname", None)
        spec.pop("domainname", None)
    linux = spec.setdefault("linux", {})
    linux["namespaces"] = _namespaces(linux.get("namespaces") or [], pod, pid_mode)
    if pod.userns_pid:
        spec["mounts"] = _userns_mounts(spec["mounts"])
    # The host's cgroup parent means nothing in the guest; the guest has one cgroup per
    # container under a parent of its own.
    linux["cgroupsPath"] = f"{CGROUP_PARENT}/{container_id}"
    if devices:
        listed = [d for d in linux.get("devices") or [] if isinstance(d, dict)]
        taken = {d.get("path") for d in listed}
        linux["devices"] = listed + [dict(d) for d in devices if d["path"] not in taken]
    resources = linux.get("resources") or {}
    if hugepage_sizes is not None and resources.get("hugepageLimits"):
        # kubelet limits every huge page size of the node (to 0 unless the pod asks for huge
        # pages); a size the guest kernel lacks has no hugetlb cgroup file, and runc fails
        # on it. No page of that size can be had in the guest: there is nothing to limit.
        kept = [h for h in resources["hugepageLimits"]
                if isinstance(h, dict) and h.get("pageSize") in hugepage_sizes]
        if kept:
            resources["hugepageLimits"] = kept
        else:
            del resources["hugepageLimits"]
    # Hooks name host binaries, which the guest does not have.
    spec.pop("hooks", None)
    return spec


def exec_process(container_spec: dict[str, Any], argv: list[str], env: list[str], cwd: str,
                 user: tuple[int, int, list[int]] | None) -> dict[str, Any]:
    """process.json for `runc exec`: the container's process (capabilities, no_new_privs,
    apparmor, rlimits, ...) with the exec's argv, and env/cwd/user when given."""
    process: dict[str, Any] = copy.deepcopy(container_spec["process"])
    process["args"] = list(argv)
    process["terminal"] = False
    process.pop("consoleSize", None)
    if env:
        process["env"] = list(env)
    if cwd:
        process["cwd"] = cwd
    if user is not None:
        process["user"] = {"uid": user[0], "gid": user[1], "additionalGids": list(user[2])}
    return process
