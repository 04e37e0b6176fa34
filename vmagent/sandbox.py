"""SetupSandbox: the pod-level state of the guest (clock, RNG, hostname, resolv.conf, hosts,
sysctls). Files go under the agent's run directory (tmpfs) and are bind-mounted into containers
later.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import time

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb

log = logging.getLogger("vmagent")

# linux/random.h: add bytes (crediting their bits), then reseed the kernel's generator from them.
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207
_SYSCTL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:")


def sysctl_path(key: str, root: str = "/proc/sys") -> str:
    """/proc/sys path of a sysctl; a key with slashes is already a path (interface names such as
    eth0.100 contain dots, so the dotted form cannot name them)."""
    if not key or not set(key) <= _SYSCTL_CHARS:
        raise GRPCError(Status.INVALID_ARGUMENT, f"invalid sysctl name {key!r}")
    rel = key if "/" in key else key.replace(".", "/")
    parts = rel.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise GRPCError(Status.INVALID_ARGUMENT, f"invalid sysctl name {key!r}")
    return os.path.join(root, *parts)


def _write_atomic(path: str, content: str) -> None:
    # The run directory is tmpfs: these writes never wait on a disk.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(content)
    os.replace(tmp, path)


def apply_sysctl(key: str, value: str) -> None:
    path = sysctl_path(key)
    try:
        with open(path, "w") as f:  # procfs
            f.write(value)
    except OSError as exc:
        code = Status.INVALID_ARGUMENT if exc.errno in (errno.ENOENT, errno.EINVAL) else (
            Status.FAILED_PRECONDITION if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
            else Status.INTERNAL)
        raise GRPCError(code, f"sysctl {key}={value!r}: {exc.strerror}") from exc


# The guest is the pod's node: it gets the memory tunables kubelet sets on every node
# (pkg/kubelet/cm/container_manager_linux.go, setupKernelTunables). With the kernel's default
# heuristic overcommit a small guest refuses an allocation larger than its RAM outright, so a
# container over its limit saw ENOMEM ("dd: out of memory", reason Error) where a node's
# container is OOM-killed by its cgroup (reason OOMKilled).
NODE_TUNABLES = {"vm.overcommit_memory": "1", "vm.panic_on_oom": "0"}


def apply_node_tunables(root: str = "/proc/sys") -> list[str]:
    """Set NODE_TUNABLES where they differ; returns the keys changed. A failure is logged, not
    raised: the agent serves on with the kernel's defaults."""
    changed = []
    for key, value in NODE_TUNABLES.items():
        path = sysctl_path(key, root)
        try:
            with open(path) as f:  # procfs
                if f.read().strip() == value:
                    continue
            with open(path, "w") as f:
                f.write(value)
            changed.append(key)
        except OSError as exc:
            log.warning("node tunable %s=%s: %s", key, value, exc.strerror)
    return changed


def set_clock(realtime_ns: int) -> None:
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, realtime_ns)
    except OSError as exc:
        code = Status.INVALID_ARGUMENT if exc.errno == errno.EINVAL else Status.INTERNAL
        raise GRPCError(code, f"set the clock to {realtime_ns} ns: {exc.strerror}") from exc


def reseed_rng(entropy: bytes, device: str = "/dev/urandom") -> None:
    """Mix `entropy` into the kernel RNG and reseed it now, not at its next periodic reseed."""
    if len(entropy) % 4:
        raise GRPCError(Status.INVALID_ARGUMENT, "entropy must be a multiple of 4 bytes")
    pool_info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _RNDADDENTROPY, pool_info)
            fcntl.ioctl(fd, _RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as exc:
        raise GRPCError(Status.INTERNAL, f"reseed the RNG: {exc.strerror}") from exc


def setup_sandbox(req: pb.SetupSandboxRequest, run_dir: str) -> pb.SetupSandboxResponse:
    """Apply the pod settings in the order a failure is cheapest to report: validate, then act.
    The clock and RNG come first: everything after may use them."""
    for key in req.sysctls:
        sysctl_path(key)
    if req.realtime_ns:
        set_clock(req.realtime_ns)
    if req.entropy:
        reseed_rng(req.entropy)
    os.makedirs(run_dir, exist_ok=True)
    resp = pb.SetupSandboxResponse()
    if req.hostname:
        try:
            socket.sethostname(req.hostname)
        except OSError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"sethostname({req.hostname!r}): {exc.strerror}") from exc
        _write_atomic(os.path.join(run_dir, "hostname"), req.hostname + "\n")
    resp.hostname = socket.gethostname()
    if req.resolv_conf:
        resp.resolv_conf_path = os.path.join(run_dir, "resolv.conf")
        _write_atomic(resp.resolv_conf_path, req.resolv_conf)
    if req.hosts:
        resp.hosts_path = os.path.join(run_dir, "hosts")
        _write_atomic(resp.hosts_path, req.hosts)
    for key in sorted(req.sysctls):
        apply_sysctl(key, req.sysctls[key])
        resp.applied_sysctls.append(key)
    log.info("sandbox set up sandbox=%s hostname=%s sysctls=%d", req.sandbox_id,
             resp.hostname, len(resp.applied_sysctls))
    return resp
