"""OCI runtime spec (runc config.json) generation from the CRI configs and the image config.

Backend-neutral: it builds what the CRI asks for, and a backend's `SpecPolicy` says what that
backend refuses or drops (host namespaces, host devices, LSM labels) and its cgroup driver.
Runs on the host per CreateContainer; the backend completes what only it knows: `root.path`,
user and group names resolved in the container's /etc/passwd and /etc/group, the supplementary
groups from the image, and every device node for privileged containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import FailedPrecondition, InvalidArgument, Unimplemented
from criserver.runtime import seccomp_default, validate

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"
# Pod-level files the agent writes in the guest; the containers bind-mount them.
SANDBOX_DIR = "/run/criserver/vm"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = 2**32 - 1  # uid/gid are uint32; 2**32-1 is (uid_t)-1, refused by the kernel anyway

# containerd's default capability set.
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
# Every capability up to CAP_CHECKPOINT_RESTORE (40), in kernel number order.
ALL_CAPS = tuple("CAP_" + name for name in """
CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE
NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO
SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG
MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM
BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE
""".split())
CAP_NUMBER = {cap: number for number, cap in enumerate(ALL_CAPS)}

# containerd's defaults; kubelet normally sends the same lists in the CRI fields.
DEFAULT_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
)
DEFAULT_READONLY_PATHS = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)

PROPAGATION = {
    cri.PROPAGATION_PRIVATE: "rprivate",
    cri.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.PROPAGATION_BIDIRECTIONAL: "rshared",
}
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
SYSCTL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
CGROUP_DRIVERS = ("cgroupfs", "systemd")
# The namespaces a pod may share with the node (CRI NamespaceMode NODE).
NODE_KINDS = ("network", "pid", "ipc")


@dataclass(frozen=True)
class SpecPolicy:
    """What a backend lets a container spec carry, and how. The defaults are a host's: the spec
    has everything the CRI asks for (CDI devices aside: there is no CDI registry yet).

    A reason string set means refused (or dropped), with the reason in the error or log line.
    """

    # kind ("network", "pid", "ipc") -> why mode NODE is refused; the others join the node's.
    node_namespaces_refused: Mapping[str, str] = field(default_factory=dict)
    devices_refused: str = ""  # why CRI devices (host and CDI) are refused
    apparmor_dropped: str = ""  # why AppArmor profiles are dropped (logged, not an error)
    selinux_dropped: str = ""  # why SELinux labels and relabels are dropped (logged)
    bidirectional_refused: str = ""  # why Bidirectional mount propagation is refused
    # The profile that AppArmor "runtime/default" names; "": none (the backend loads it).
    apparmor_default: str = ""
    # Filled in with the CRI's SELinux user, role, type and level where those are set.
    selinux_default: str = "system_u:system_r:container_t:s0"
    cgroup_driver: str = "cgroupfs"  # as runc's --systemd-cgroup: "cgroupfs" or "systemd"
    # Whether the pod's CRI cgroup_parent is its containers' parent cgroup (default parents:
    # /criserver/<pod id> with cgroupfs, system.slice with systemd).
    pod_cgroup_parent: bool = True

    def __post_init__(self) -> None:
        if self.cgroup_driver not in CGROUP_DRIVERS:
            raise ValueError(f"cgroup driver {self.cgroup_driver!r} is not one of "
                             f"{', '.join(CGROUP_DRIVERS)}")
        unknown = set(self.node_namespaces_refused) - set(NODE_KINDS)
        if unknown:
            raise ValueError(f"unknown namespace kinds {sorted(unknown)}")
        if len(self.selinux_default.split(":", 3)) != 4:
            raise ValueError(f"selinux default {self.selinux_default!r} is not "
                             "user:role:type:level")

    def check_namespaces(self, options: cri.NamespaceOption,
                         kinds: Iterable[str] = NODE_KINDS) -> None:
        """:raises InvalidArgument: `options` put one of `kinds` in mode NODE, refused here."""
        modes = {"network": options.network, "pid": options.pid, "ipc": options.ipc}
        for kind in kinds:
            reason = self.node_namespaces_refused.get(kind)
            if reason and modes[kind] == cri.NODE:
                raise InvalidArgument(f"{kind} namespace mode NODE: {reason}")


@dataclass(frozen=True)
class ImageConfigView:
    """The parts of an image config a container spec is built from."""

    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    volumes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageConfigView:
        """From `ImageRecord.config` (`ImageConfigInfo.as_dict()`)."""
        return cls(
            user=str(config.get("user") or ""),
            entrypoint=tuple(str(v) for v in config.get("entrypoint") or ()),
            cmd=tuple(str(v) for v in config.get("cmd") or ()),
            env=tuple(str(v) for v in config.get("env") or ()),
            working_dir=str(config.get("working_dir") or ""),
            volumes=tuple(str(v) for v in config.get("volumes") or ()),
        )


@dataclass(frozen=True)
class PodNamespaces:
    """Guest paths of the pod's namespaces (e.g. /proc/<pid>/ns/ipc of the pod's holder)."""

    ipc: str
    uts: str
    pid: str | None = None  # None: the pod has no shared pid namespace
    net: str | None = None  # None: the VM's root network namespace (no entry in the spec)
    target_pid: str | None = None  # pid namespace of the target of NamespaceMode TARGET


@dataclass(frozen=True)
class GeneratedSpec:
    """A container's OCI spec and what the agent must resolve in the guest before `runc create`.

    The agent sets `root.path`, then resolves the user: when `username` is set, uid (and gid
    unless given) from the container's /etc/passwd; when `groupname` is set, gid from
    /etc/group; when `gid_from_passwd`, gid is the primary group of the uid in /etc/passwd (0 if
    the uid has no entry). `process.user.additionalGids` then becomes: the final gid, the groups of
    /etc/group listing the user (only if `merge_image_groups`), then the gids already in the spec
    (the CRI supplemental groups), without duplicates. With `guest_devices`, every device node
    of the /dev where the container runs (a micro-VM's: the guest's) goes into `linux.devices`
    (privileged containers). `selinux_relabel` lists the host paths of mounts the backend must
    relabel to the container's SELinux label (none when the policy drops SELinux).
    """

    spec: dict[str, Any]
    username: str = ""
    groupname: str = ""
    gid_from_passwd: bool = False
    merge_image_groups: bool = True
    guest_devices: bool = False
    selinux_relabel: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(self.spec, separators=(",", ":")).encode()

    def user_text(self) -> str:
        """The user as `vmagent.users.resolve_user` takes it ("name", "uid:gid", "name:group"),
        resolved against the container's own /etc/passwd and /etc/group by whoever sees its
        rootfs (the guest agent, or the runc backend on the host)."""
        user = self.spec["process"].get("user", {})
        name = self.username or str(user.get("uid", 0))
        if self.groupname:
            return f"{name}:{self.groupname}"
        if self.gid_from_passwd or self.username:
            return name
        return f"{name}:{user.get('gid', 0)}"


@dataclass
class _User:
    uid: int = 0
    gid: int = 0
    username: str = ""
    groupname: str = ""
    gid_from_passwd: bool = False


async def generate_async(
    container: cri.ContainerConfig,
    pod: cri.PodSandboxConfig,
    image: ImageConfigView | None,
    namespaces: PodNamespaces,
    guest_path: Callable[[cri.Mount], str],
    **kwargs: Any,
) -> GeneratedSpec:
    """`generate` in a thread: it may read a Localhost seccomp profile from the host's disk."""
    return await asyncio.to_thread(
        generate, container, pod, image, namespaces, guest_path, **kwargs
    )


def generate(
    container: cri.ContainerConfig,
    pod: cri.PodSandboxConfig,
    image: ImageConfigView | None,
    namespaces: PodNamespaces,
    guest_path: Callable[[cri.Mount], str],
    *,
    policy: SpecPolicy,
    container_id: str,
    sandbox_id: str,
    image_name: str = "",
    cgroup_parent: str = "",
    pids_limit: int | None = None,
    sandbox_dir: str = SANDBOX_DIR,
    image_volumes: Mapping[str, str] | None = None,
) -> GeneratedSpec:
    """The OCI spec of one container of a pod, within what `policy` allows.

    Reads the file of a Localhost seccomp profile and stats the CRI devices (small, blocking):
    call it from a thread, as `generate_async` does. `guest_path` maps each CRI host path mount
    to the path the container's runc sees (the host path on a host); `image_volumes` maps the
    container_path of each image volume (Mount.image) to where the image (or its sub path) is.
    :raises InvalidArgument: a CRI or image setting is malformed, or refused by `policy`.
    :raises Unimplemented: devices refused by `policy`, CDI devices, image mounts without a path.
    :raises FailedPrecondition: the pod lacks a namespace the container asks to share.
    """
    image = image or ImageConfigView()
    linux = container.linux
    sc = linux.security_context
    pod_sc = pod.linux.security_context
    name = container.metadata.name
    where = f"container={container_id or name} pod={sandbox_id}"
    privileged = sc.privileged
    if privileged and not pod_sc.privileged:
        raise InvalidArgument("privileged container in a pod sandbox that is not privileged")
    if policy.devices_refused and (container.devices or container.CDI_devices):
        raise Unimplemented(policy.devices_refused)
    if container.CDI_devices:
        raise Unimplemented("CDI devices are not supported")

    user = _user(sc, image.user)
    # The pod's user namespace is its containers' (kubelet repeats the pod's options).
    pod_ns = pod_sc.namespace_options
    userns = validate.user_namespace(pod_ns)
    if sc.namespace_options.HasField("userns_options") and (
        validate.user_namespace(sc.namespace_options) != userns
        or (userns and sc.namespace_options.userns_options != pod_ns.userns_options)
    ):
        raise InvalidArgument("a container's user namespace must be its pod's")
    if userns and privileged:
        raise InvalidArgument("privileged containers cannot run in a user namespace")
    caps = _capabilities(sc)
    if image.volumes:
        # Image VOLUMEs stay plain directories of the writable rootfs, as with containerd's
        # ignore_image_defined_volumes: kubelet mounts real volumes where the pod asks for them.
        log.debug("image volumes ignored %s volumes=%s", where, ",".join(image.volumes))
    apparmor = _apparmor(sc, policy, where)
    selinux = _selinux(sc, policy, where)

    process: dict[str, Any] = {
        "terminal": container.tty,
        "user": {"uid": user.uid, "gid": user.gid},
        "args": _args(container, image),
        "env": _env(container, image, pod.hostname),
        "cwd": container.working_dir or image.working_dir or "/",
        "capabilities": caps,
        "noNewPrivileges": sc.no_new_privs,
    }
    groups = _supplemental_groups(sc.supplemental_groups)
    if groups:
        process["user"]["additionalGids"] = groups
    if linux.HasField("resources"):
        adj = linux.resources.oom_score_adj
        if not -1000 <= adj <= 1000:
            raise InvalidArgument(f"oom_score_adj {adj} is outside [-1000, 1000]")
        process["oomScoreAdj"] = adj
    if apparmor:
        process["apparmorProfile"] = apparmor
    if selinux:
        process["selinuxLabel"] = selinux

    ns_options = sc.namespace_options
    mounts, rootfs_propagation, relabel = _mounts(
        container, sc, guest_path, privileged, sandbox_dir, where, image_volumes or {},
        policy,
    )
    host_network = ns_options.network == cri.NODE
    sysctls = _sysctls(pod, None if host_network else namespaces.net)
    policy.check_namespaces(ns_options)
    parent = cgroup_parent or (pod.linux.cgroup_parent if policy.pod_cgroup_parent else "")
    spec_linux: dict[str, Any] = {
        "cgroupsPath": _cgroups_path(policy.cgroup_driver, parent, sandbox_id, container_id),
        "namespaces": _namespaces(ns_options, namespaces, privileged, userns),
        "resources": _resources(linux, privileged, pids_limit),
    }
    if container.devices:
        spec_linux["devices"] = _devices(container.devices, spec_linux["resources"]["devices"])
    if sysctls:
        spec_linux["sysctl"] = sysctls
    if userns:
        spec_linux["uidMappings"] = _id_mappings(pod_ns.userns_options.uids)
        spec_linux["gidMappings"] = _id_mappings(pod_ns.userns_options.gids)
    if not privileged:
        spec_linux["maskedPaths"] = list(sc.masked_paths or DEFAULT_MASKED_PATHS)
        spec_linux["readonlyPaths"] = list(sc.readonly_paths or DEFAULT_READONLY_PATHS)
        profile = _seccomp(sc, caps["bounding"], where)
        if profile is not None:
            spec_linux["seccomp"] = profile
    if rootfs_propagation:
        spec_linux["rootfsPropagation"] = rootfs_propagation

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        # The agent replaces the path with the container's rootfs in the guest.
        "root": {"path": "rootfs", "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": _annotations(container, pod, sandbox_id, image_name),
        "linux": spec_linux,
    }
    if pod.hostname and not host_network:  # the node's UTS namespace keeps the node's name
        spec["hostname"] = pod.hostname
    return GeneratedSpec(
        spec=spec,
        username=user.username,
        groupname=user.groupname,
        gid_from_passwd=user.gid_from_passwd,
        merge_image_groups=sc.supplemental_groups_policy != cri.Strict,
        guest_devices=privileged,
        selinux_relabel=relabel,
    )


def _args(container: cri.ContainerConfig, image: ImageConfigView) -> list[str]:
    # Kubernetes' rules: command replaces the entrypoint and drops the image's cmd; args alone
    # replace only the cmd.
    if container.command:
        args = [*container.command, *container.args]
    else:
        args = [*image.entrypoint, *(container.args or image.cmd)]
    if not args:
        raise InvalidArgument("no command: neither the container config nor the image has one")
    return args


def _env(container: cri.ContainerConfig, image: ImageConfigView, hostname: str) -> list[str]:
    env: dict[str, str] = {}  # key -> "key=value"; dicts keep the first insertion's position

    def put(entry: str) -> None:
        key = entry.split("=", 1)[0]
        if key:
            env[key] = entry

    put(DEFAULT_PATH_ENV)
    if hostname:
        put(f"HOSTNAME={hostname}")
    for entry in image.env:
        put(entry)
    for kv in container.envs:
        put(f"{kv.key}={_env_value(kv.key, kv.value)}")
    return list(env.values())


def _env_value(key: str, value: bytes | str) -> str:
    # Our CRI proto carries env values as bytes; the OCI spec is JSON: UTF-8 text only.
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"env {key}: value is not UTF-8") from exc
    if "\0" in value or "\0" in key:
        raise InvalidArgument(f"env {key!r}: NUL byte")
    return value


def _check_id(value: int, what: str) -> int:
    if not 0 <= value < MAX_ID:
        raise InvalidArgument(f"{what} {value} is not a valid id")
    return value


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r} is not a valid user or group name")
    return value


def _user(sc: cri.LinuxContainerSecurityContext, image_user: str) -> _User:
    has_uid = sc.HasField("run_as_user")
    has_name = bool(sc.run_as_username)
    if has_uid and has_name:
        raise InvalidArgument("run_as_user and run_as_username are mutually exclusive")
    if sc.HasField("run_as_group") and not (has_uid or has_name):
        raise InvalidArgument("run_as_group is set without run_as_user or run_as_username")
    user = _User()
    if has_uid:
        user.uid = _check_id(sc.run_as_user.value, "run_as_user")
        user.gid_from_passwd = True
    elif has_name:
        user.username = _check_name(sc.run_as_username, "run_as_username")
        user.gid_from_passwd = True
    else:
        user = _image_user(image_user)
    if sc.HasField("run_as_group"):
        user.gid = _check_id(sc.run_as_group.value, "run_as_group")
        user.groupname = ""
        user.gid_from_passwd = False
    return user


def _image_user(text: str) -> _User:
    """The image's User: "", "uid", "name", "uid:gid", "name:group" (and mixes)."""
    if not text:
        return _User(gid_from_passwd=True)
    parts = text.split(":")
    if len(parts) > 2 or not all(parts):
        raise InvalidArgument(f"image user {text!r} is not user[:group]")
    user = _User()
    if parts[0].isdigit():
        user.uid = _check_id(int(parts[0]), "image uid")
    else:
        user.username = _check_name(parts[0], "image user")
    if len(parts) == 1:
        user.gid_from_passwd = True
    elif parts[1].isdigit():
        user.gid = _check_id(int(parts[1]), "image gid")
    else:
        user.groupname = _check_name(parts[1], "image group")
    return user


def _supplemental_groups(groups: Iterable[int]) -> list[int]:
    result: list[int] = []
    for gid in groups:
        _check_id(gid, "supplemental group")
        if gid not in result:
            result.append(gid)
    return result


def _cap_name(text: str) -> str:
    name = text.strip().upper()
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name not in CAP_NUMBER:
        raise InvalidArgument(f"unknown capability {text!r}")
    return name


def _capabilities(sc: cri.LinuxContainerSecurityContext) -> dict[str, list[str]]:
    if sc.privileged:
        every = list(ALL_CAPS)
        return {"bounding": every, "effective": every, "permitted": every,
                "inheritable": [], "ambient": []}
    c = sc.capabilities
    add = [x for x in c.add_capabilities if x.strip().upper() != "ALL"]
    drop = [x for x in c.drop_capabilities if x.strip().upper() != "ALL"]
    ambient_all = any(x.strip().upper() == "ALL" for x in c.add_ambient_capabilities)
    ambient = [x for x in c.add_ambient_capabilities if x.strip().upper() != "ALL"]
    main = set(DEFAULT_CAPS)  # bounding, effective and permitted move together
    # Defaults stay out of the inheritable set (CVE-2022-24769); the CRI puts added ones in it.
    inheritable: set[str] = set()
    ambient_set: set[str] = set()
    # "ALL" first, so that individual entries refine it: add ALL + drop CHOWN = all but CHOWN.
    if len(add) != len(c.add_capabilities):
        main |= set(ALL_CAPS)
    if len(drop) != len(c.drop_capabilities):
        main.clear()
    for name in map(_cap_name, add):
        main.add(name)
        inheritable.add(name)
    for name in [*map(_cap_name, ambient), *(ALL_CAPS if ambient_all else ())]:
        # The kernel keeps an ambient capability only if it is permitted and inheritable.
        main.add(name)
        inheritable.add(name)
        ambient_set.add(name)
    for name in map(_cap_name, drop):
        main.discard(name)
        inheritable.discard(name)
        ambient_set.discard(name)
    ordered = sorted(main, key=CAP_NUMBER.__getitem__)
    return {
        "bounding": ordered, "effective": list(ordered), "permitted": list(ordered),
        "inheritable": sorted(inheritable, key=CAP_NUMBER.__getitem__),
        "ambient": sorted(ambient_set, key=CAP_NUMBER.__getitem__),
    }


def _apparmor(sc: cri.LinuxContainerSecurityContext, policy: SpecPolicy, where: str) -> str:
    """The container's `process.apparmorProfile` ("": none)."""
    if policy.apparmor_dropped:
        named = sc.apparmor.localhost_ref if sc.HasField("apparmor") else sc.apparmor_profile
        if named and named not in ("runtime/default", "unconfined"):
            log.info("apparmor profile ignored: %s %s profile=%s",
                     policy.apparmor_dropped, where, named)
        return ""
    if sc.HasField("apparmor"):
        kind, ref = sc.apparmor.profile_type, sc.apparmor.localhost_ref
    else:
        # The deprecated string field: "" and "unconfined" mean none.
        text = sc.apparmor_profile
        if text in ("", "unconfined"):
            return ""
        if text == "runtime/default":
            kind, ref = cri.SecurityProfile.RuntimeDefault, ""
        elif text.startswith("localhost/"):
            kind, ref = cri.SecurityProfile.Localhost, text
        else:
            raise InvalidArgument(f"unknown apparmor profile {text!r}")
    if kind == cri.SecurityProfile.Unconfined:
        return ""
    if kind == cri.SecurityProfile.RuntimeDefault:
        # As containerd: the default profile does not confine a privileged container.
        return "" if sc.privileged else policy.apparmor_default
    if kind != cri.SecurityProfile.Localhost:
        raise InvalidArgument(f"unknown apparmor profile type {kind}")
    name = ref.removeprefix("localhost/")
    if not name:
        raise InvalidArgument("apparmor profile type Localhost without a profile name")
    return name


def _selinux(sc: cri.LinuxContainerSecurityContext, policy: SpecPolicy, where: str) -> str:
    """The container's `process.selinuxLabel` ("": none): the policy's default label with the
    parts the CRI sets replaced."""
    options = sc.selinux_options
    given = (options.user, options.role, options.type, options.level)
    if not sc.HasField("selinux_options") or not any(given):
        return ""
    if policy.selinux_dropped:
        log.info("selinux options ignored: %s %s", policy.selinux_dropped, where)
        return ""
    if sc.privileged:  # as containerd: privileged containers run unlabelled (spc_t)
        return ""
    parts = policy.selinux_default.split(":", 3)
    return ":".join(value or default for value, default in zip(given, parts, strict=True))


def _bind(source: str, destination: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _default_mounts(privileged: bool) -> list[dict[str, Any]]:
    sys_mode = "rw" if privileged else "ro"
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", sys_mode]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", sys_mode]},
    ]


def _mounts(
    container: cri.ContainerConfig,
    sc: cri.LinuxContainerSecurityContext,
    guest_path: Callable[[cri.Mount], str],
    privileged: bool,
    sandbox_dir: str,
    where: str,
    image_volumes: Mapping[str, str],
    policy: SpecPolicy,
) -> tuple[list[dict[str, Any]], str, tuple[str, ...]]:
    """Default mounts not overridden, then CRI and pod-file mounts, parents before children;
    the rootfs propagation; the host paths to relabel for SELinux."""
    supplied: list[dict[str, Any]] = []
    propagation = ""
    relabel: list[str] = []
    for m in container.mounts:
        dest = m.container_path
        if not dest or not os.path.isabs(dest):
            raise InvalidArgument(f"mount container_path {dest!r} is not an absolute path")
        if m.HasField("image") and m.image.image:
            # Read-only by definition: validate.image_mount has refused anything else.
            source = image_volumes.get(dest)
            if source is None:
                raise Unimplemented(f"image volume mounts are not supported (mount at {dest})")
        elif not m.host_path:
            raise InvalidArgument(f"mount at {dest} has no host_path")
        else:
            source = guest_path(m)
        if m.uidMappings or m.gidMappings:
            raise Unimplemented(f"id-mapped mounts are not supported (mount at {dest})")
        if m.propagation not in PROPAGATION:
            raise InvalidArgument(f"mount at {dest}: unknown propagation {m.propagation}")
        if m.recursive_read_only and not m.readonly:
            raise InvalidArgument(f"mount at {dest}: recursive_read_only needs readonly")
        if m.recursive_read_only and m.propagation != cri.PROPAGATION_PRIVATE:
            raise InvalidArgument(f"mount at {dest}: recursive_read_only needs private propagation")
        if m.propagation == cri.PROPAGATION_BIDIRECTIONAL and policy.bidirectional_refused:
            raise InvalidArgument(f"mount at {dest}: Bidirectional propagation: "
                                  f"{policy.bidirectional_refused}")
        if m.selinux_relabel and policy.selinux_dropped:
            log.info("selinux relabel ignored: %s %s mount=%s", policy.selinux_dropped, where,
                     dest)
        elif m.selinux_relabel and m.host_path and m.host_path not in relabel:
            relabel.append(m.host_path)
        mode = "rro" if m.recursive_read_only else "ro" if m.readonly else "rw"
        options = ["rbind", PROPAGATION[m.propagation], mode]
        # Propagation out of a mount needs the container's root to propagate too.
        if m.propagation == cri.PROPAGATION_BIDIRECTIONAL:
            propagation = "rshared"
        elif m.propagation == cri.PROPAGATION_HOST_TO_CONTAINER and propagation != "rshared":
            propagation = "rslave"
        supplied.append(_bind(source, os.path.normpath(dest), options))

    taken = {m["destination"] for m in supplied}
    files_mode = "ro" if sc.readonly_rootfs else "rw"
    pod_files = [
        ("/etc/hostname", f"{sandbox_dir}/hostname", files_mode),
        ("/etc/hosts", f"{sandbox_dir}/hosts", files_mode),
        ("/etc/resolv.conf", f"{sandbox_dir}/resolv.conf", files_mode),
    ]
    # A private IPC namespace keeps its own shm; the node's IPC namespace goes with its shm.
    ipc = sc.namespace_options.ipc
    if ipc == cri.NODE:
        pod_files.append(("/dev/shm", "/dev/shm", "rw"))
    elif ipc != cri.CONTAINER:
        pod_files.append(("/dev/shm", f"{sandbox_dir}/shm", "rw"))
    for dest, source, mode in pod_files:
        if dest not in taken:
            supplied.append(_bind(source, dest, ["rbind", "rprivate", mode]))
            taken.add(dest)

    mounts = [
        m for m in _default_mounts(privileged)
        if m["destination"] not in taken
        and not ("/dev" in taken and m["destination"].startswith("/dev/"))
    ]
    supplied.sort(key=lambda m: m["destination"].rstrip("/").count("/"))  # stable
    return mounts + supplied, propagation, tuple(relabel)


def _namespaces(
    options: cri.NamespaceOption, ns: PodNamespaces, privileged: bool, userns: bool
) -> list[dict[str, str]]:
    """Mode NODE is no entry: the container stays in the node's namespace of that kind."""
    if options.network == cri.TARGET or options.ipc == cri.TARGET:
        raise InvalidArgument("namespace mode TARGET is valid only for the pid namespace")
    result: list[dict[str, str]] = [{"type": "mount"}]
    if userns:
        # No path: the agent creates the pod's user namespace and has its containers join it.
        result.append({"type": "user"})
    if options.pid == cri.NODE:
        pass
    elif options.pid == cri.CONTAINER:
        result.append({"type": "pid"})
    elif options.pid == cri.TARGET:
        if not options.target_id:
            raise InvalidArgument("pid namespace mode TARGET without target_id")
        if not ns.target_pid:
            raise FailedPrecondition(f"no pid namespace known for target {options.target_id}")
        result.append({"type": "pid", "path": ns.target_pid})
    elif ns.pid:
        result.append({"type": "pid", "path": ns.pid})
    else:
        raise FailedPrecondition("the pod has no shared pid namespace for pid mode POD")
    # ipc CONTAINER cannot come from kubelet but costs nothing to honour.
    if options.ipc == cri.CONTAINER:
        result.append({"type": "ipc"})
    elif options.ipc != cri.NODE:
        result.append({"type": "ipc", "path": ns.ipc})
    # As containerd: a hostNetwork pod has the node's UTS namespace (its hostname) too.
    if options.network != cri.NODE:
        result.append({"type": "uts", "path": ns.uts})
        if ns.net:
            result.append({"type": "network", "path": ns.net})
    if not privileged:
        # The guest runs cgroup v2: a private cgroup namespace hides the pod's hierarchy.
        result.append({"type": "cgroup"})
    return result


def _cgroups_path(driver: str, parent: str, sandbox_id: str, container_id: str) -> str:
    if driver == "systemd":
        # As containerd: kubelet's systemd parent is a path of slices; runc wants the last one
        # in its "slice:prefix:name" form.
        base = os.path.basename(parent.rstrip("/")) or "system.slice"
        if not base.endswith(".slice"):
            raise InvalidArgument(f"cgroup parent {parent!r} is not a systemd slice")
        return f"{base}:criserver:{container_id}"
    return f"{(parent or '/criserver/' + sandbox_id).rstrip('/')}/{container_id}"


def _devices(devices: Iterable[cri.Device], rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`linux.devices` for the CRI's host devices (a directory: the device nodes under it),
    appending their allow rules to `rules` (`linux.resources.devices`)."""
    result: list[dict[str, Any]] = []
    for device in devices:
        access = device.permissions or "rwm"
        if not set(access) <= set("rwm"):
            raise InvalidArgument(f"device {device.host_path}: permissions {access!r} are not "
                                  "a subset of rwm")
        if not os.path.isabs(device.host_path) or not os.path.isabs(device.container_path):
            raise InvalidArgument(f"device {device.host_path!r} at {device.container_path!r}: "
                                  "paths must be absolute")
        for host, inside in _device_nodes(device.host_path, device.container_path):
            try:
                st = os.stat(host)
            except OSError as exc:
                raise InvalidArgument(f"device {host}: {exc.strerror}") from exc
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else ""
            if not kind:
                raise InvalidArgument(f"device {host} is not a device node")
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            result.append({"path": inside, "type": kind, "major": major, "minor": minor,
                           "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                           "gid": st.st_gid})
            rules.append({"allow": True, "type": kind, "major": major, "minor": minor,
                          "access": access})
    return result


def _device_nodes(host_path: str, container_path: str) -> list[tuple[str, str]]:
    """(host path, container path) of a device, or of each device node under a directory."""
    if not os.path.isdir(host_path):
        return [(host_path, container_path)]
    nodes = []
    for dirpath, dirnames, filenames in os.walk(host_path):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            mode = 0
            with contextlib.suppress(OSError):  # gone meanwhile, or a broken link
                mode = os.stat(path).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                nodes.append((path, os.path.join(container_path, os.path.relpath(path, host_path))))
    return nodes


def _id_mappings(mappings: Iterable[cri.IDMapping]) -> list[dict[str, int]]:
    return [{"containerID": m.container_id, "hostID": m.host_id, "size": m.length}
            for m in mappings]


def _sysctls(pod: cri.PodSandboxConfig, net: str | None) -> dict[str, str]:
    """The pod's sysctls for the spec: all but net.* when the container has no network
    namespace of its own (`net`)."""
    kept: dict[str, str] = {}
    for key, value in sorted(pod.linux.sysctls.items()):
        if not SYSCTL_RE.fullmatch(key) or ".." in key:
            raise InvalidArgument(f"invalid sysctl name {key!r}")
        # runc refuses net.* without a network namespace of the container's own; a micro-VM is
        # the pod's network namespace, where the agent applies them at sandbox setup (and a
        # hostNetwork container must not change the node's network).
        if not (key.replace("/", ".").startswith("net.") and not net):
            kept[key] = value
    return kept


def update_resources(resources: cri.LinuxContainerResources) -> dict[str, Any]:
    """OCI `linux.resources` for UpdateContainerResources (what `runc update` reads)."""
    result = _resources(cri.LinuxContainerConfig(resources=resources), False, None)
    result.pop("devices", None)  # not updatable, and unchanged
    return result


# What the kernel's CFS and cgroup files accept (kubelet sends values inside these); outside
# them runc fails after the container exists, which the caller saw as INTERNAL.
CPU_SHARES = (2, 262_144)
CPU_PERIOD_US = (1_000, 1_000_000)
MIN_CPU_QUOTA_US = 1_000
_CPU_LIST = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")
_CGROUP_FILE = re.compile(r"^[a-z][a-z0-9_]*\.[a-z0-9_.]+$")


def _check_resources(r: cri.LinuxContainerResources) -> None:
    """:raises InvalidArgument: a value no cgroup takes (0 is "unset" everywhere)."""
    if r.cpu_shares and not CPU_SHARES[0] <= r.cpu_shares <= CPU_SHARES[1]:
        raise InvalidArgument(f"cpu_shares {r.cpu_shares} is outside {list(CPU_SHARES)}")
    if r.cpu_period and not CPU_PERIOD_US[0] <= r.cpu_period <= CPU_PERIOD_US[1]:
        raise InvalidArgument(f"cpu_period {r.cpu_period} is outside {list(CPU_PERIOD_US)} us")
    if r.cpu_quota and r.cpu_quota != -1 and r.cpu_quota < MIN_CPU_QUOTA_US:
        raise InvalidArgument(f"cpu_quota {r.cpu_quota}: -1 (no limit) or at least "
                              f"{MIN_CPU_QUOTA_US} us")
    if r.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"memory_limit_in_bytes {r.memory_limit_in_bytes} is negative")
    if r.memory_swap_limit_in_bytes < -1:
        raise InvalidArgument(f"memory_swap_limit_in_bytes {r.memory_swap_limit_in_bytes}: "
                              "-1 (no limit) or not negative")
    for what, cpus in (("cpuset_cpus", r.cpuset_cpus), ("cpuset_mems", r.cpuset_mems)):
        if cpus and not _CPU_LIST.match(cpus):
            raise InvalidArgument(f"{what} {cpus!r} is not a list like 0-3,5")
    for key, value in r.unified.items():
        # A cgroup file name: never a path (runc writes it inside the container's cgroup).
        if not _CGROUP_FILE.match(key) or "\0" in value:
            raise InvalidArgument(f"unified {key!r} is not a cgroup file name like memory.high")


def _resources(
    linux: cri.LinuxContainerConfig, privileged: bool, pids_limit: int | None
) -> dict[str, Any]:
    # Privileged sees every device; otherwise deny all and let runc add its standard allow-list
    # (null, zero, full, random, urandom, tty, ptmx, pts).
    result: dict[str, Any] = {"devices": [{"allow": privileged, "access": "rwm"}]}
    if pids_limit is not None:
        result["pids"] = {"limit": pids_limit}
    if not linux.HasField("resources"):
        return result
    r = linux.resources
    _check_resources(r)
    cpu: dict[str, Any] = {}
    if r.cpu_shares:
        cpu["shares"] = r.cpu_shares
    if r.cpu_quota:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    if cpu:
        result["cpu"] = cpu
    memory: dict[str, Any] = {}
    if r.memory_limit_in_bytes:
        memory["limit"] = r.memory_limit_in_bytes
    if r.memory_swap_limit_in_bytes:
        memory["swap"] = r.memory_swap_limit_in_bytes
    if memory:
        result["memory"] = memory
    if r.hugepage_limits:
        result["hugepageLimits"] = [
            {"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits
        ]
    if r.unified:
        result["unified"] = dict(sorted(r.unified.items()))
    return result


def _seccomp(
    sc: cri.LinuxContainerSecurityContext, bounding: list[str], where: str
) -> dict[str, Any] | None:
    """The seccomp profile of a non-privileged container, or None for unconfined."""
    if sc.HasField("seccomp"):
        kind, ref = sc.seccomp.profile_type, sc.seccomp.localhost_ref
    else:
        # The deprecated string field; "" means unconfined, as does an absent profile.
        path = sc.seccomp_profile_path
        if path in ("", "unconfined"):
            return None
        if path in ("runtime/default", "docker/default"):
            kind, ref = cri.SecurityProfile.RuntimeDefault, ""
        elif path.startswith("localhost/"):
            kind, ref = cri.SecurityProfile.Localhost, path.removeprefix("localhost/")
        else:
            raise InvalidArgument(f"unknown seccomp profile path {path!r}")
    if kind == cri.SecurityProfile.Unconfined:
        return None
    if kind == cri.SecurityProfile.RuntimeDefault:
        return seccomp_default.default_profile(bounding)
    if kind != cri.SecurityProfile.Localhost:
        raise InvalidArgument(f"unknown seccomp profile type {kind}")
    return _localhost_profile(ref, bounding, where)


def _localhost_profile(path: str, bounding: list[str], where: str) -> dict[str, Any]:
    if not path or not os.path.isabs(path):
        raise InvalidArgument(f"seccomp localhost profile {path!r} is not an absolute path")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except OSError as exc:
        raise InvalidArgument(f"cannot read seccomp profile {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise InvalidArgument(f"seccomp profile {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("defaultAction"), str):
        raise InvalidArgument(f"seccomp profile {path} has no defaultAction")
    log.debug("seccomp localhost profile loaded %s path=%s", where, path)
    return _to_oci_seccomp(doc, bounding, path)


def _to_oci_seccomp(doc: dict[str, Any], bounding: list[str], path: str) -> dict[str, Any]:
    """An OCI `linux.seccomp` from a profile in OCI or Docker form (archMap, includes...)."""
    profile: dict[str, Any] = {"defaultAction": doc["defaultAction"]}
    for key in ("defaultErrnoRet", "listenerPath", "listenerMetadata", "flags"):
        if key in doc:
            profile[key] = doc[key]
    arches = doc.get("architectures")
    if not arches and isinstance(doc.get("archMap"), list):
        for arch in doc["archMap"]:
            if isinstance(arch, dict) and arch.get("architecture") == "SCMP_ARCH_X86_64":
                arches = [arch["architecture"], *arch.get("subArchitectures", [])]
    if arches:
        profile["architectures"] = list(arches)
    syscalls: list[dict[str, Any]] = []
    for rule in doc.get("syscalls") or []:
        if not isinstance(rule, dict) or not isinstance(rule.get("action"), str):
            raise InvalidArgument(f"seccomp profile {path}: a syscall rule has no action")
        if not _applies(rule, bounding):
            continue
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not names:
            continue
        entry: dict[str, Any] = {"names": list(names), "action": rule["action"]}
        for key in ("errnoRet", "args"):
            if rule.get(key) is not None:
                entry[key] = rule[key]
        syscalls.append(entry)
    if syscalls:
        profile["syscalls"] = syscalls
    return profile


def _applies(rule: dict[str, Any], bounding: list[str]) -> bool:
    """Docker-form conditions: all `includes.caps` held, none of `excludes.caps` held."""
    includes = rule.get("includes") or {}
    excludes = rule.get("excludes") or {}
    if any(_known(c) not in bounding for c in includes.get("caps") or ()):
        return False
    if any(_known(c) in bounding for c in excludes.get("caps") or ()):
        return False
    arch_ok = ("amd64", "x86_64", "SCMP_ARCH_X86_64")
    if includes.get("arches") and not set(includes["arches"]) & set(arch_ok):
        return False
    return not (excludes.get("arches") and set(excludes["arches"]) & set(arch_ok))


def _known(cap: str) -> str:
    name = cap.upper()
    return name if name.startswith("CAP_") else "CAP_" + name


def _annotations(
    container: cri.ContainerConfig, pod: cri.PodSandboxConfig, sandbox_id: str, image_name: str
) -> dict[str, str]:
    annotations = dict(container.annotations)
    meta = pod.metadata
    annotations.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": container.metadata.name,
        "io.kubernetes.cri.sandbox-id": sandbox_id,
        "io.kubernetes.cri.sandbox-name": meta.name,
        "io.kubernetes.cri.sandbox-namespace": meta.namespace,
        "io.kubernetes.cri.sandbox-uid": meta.uid,
        "io.kubernetes.cri.image-name": image_name or container.image.user_specified_image
        or container.image.image,
    })
    return annotations
