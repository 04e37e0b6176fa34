"""The fast exec path: instead of `runc exec` (~0.3 s under TCG), the agent forks; the child
joins the container's cgroup and namespaces (setns on /proc/<init>/ns/*), forks again so the
exec'd process is inside the PID namespace, then drops to the exec's user, capabilities
(bounding, effective, permitted, inheritable, ambient), rlimits, no_new_privs and cwd, and
execs. Specs with seccomp, AppArmor, SELinux labels or a user namespace are not handled here:
`plan` returns None and the caller falls back to `runc exec`.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import signal
import struct
import termios
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_SYS_CAPSET = 126
_CAP_VERSION_3 = 0x20080522

CAPS = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE"
).split()
_CAP_NUMBER = {f"CAP_{name}": i for i, name in enumerate(CAPS)}
# setns order: the mount namespace last (it changes what /proc paths mean to us).
_NAMESPACES = ("cgroup", "ipc", "uts", "net", "pid", "mnt")
_RLIMITS = {f"RLIMIT_{n}": getattr(resource, f"RLIMIT_{n}") for n in (
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS",
    "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME") if hasattr(resource,
                                                                              f"RLIMIT_{n}")}


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:  # procfs
            return int(f.read())
    except (OSError, ValueError):
        return len(CAPS) - 1


_LAST_CAP = _last_cap()


def _mask(names: list[str] | None) -> int:
    out = 0
    for n in names or []:
        bit = _CAP_NUMBER.get(n)
        if bit is None:
            raise ValueError(f"unknown capability {n}")
        out |= 1 << bit
    return out


class Plan:
    """Everything the child needs, computed before fork (the child must not allocate much,
    import, or take locks)."""

    def __init__(self, init_pid: int, cgroup_dir: str, process: dict[str, Any]) -> None:
        self.init_pid = init_pid
        self.cgroup_procs = os.path.join(cgroup_dir, "cgroup.procs")
        self.argv = [str(a) for a in process["args"]]
        self.env = dict(e.split("=", 1) for e in process.get("env") or [] if "=" in e)
        self.cwd = str(process.get("cwd") or "/")
        user = process.get("user") or {}
        self.uid = int(user.get("uid", 0))
        self.gid = int(user.get("gid", 0))
        self.groups = [int(g) for g in user.get("additionalGids") or []]
        caps = process.get("capabilities") or {}
        self.bounding = _mask(caps.get("bounding"))
        self.effective = _mask(caps.get("effective"))
        self.permitted = _mask(caps.get("permitted"))
        self.inheritable = _mask(caps.get("inheritable"))
        self.ambient = [_CAP_NUMBER[n] for n in caps.get("ambient") or []]
        self.no_new_privs = bool(process.get("noNewPrivileges"))
        self.rlimits = [(_RLIMITS[r["type"]], int(r["soft"]), int(r["hard"]))
                        for r in process.get("rlimits") or []]
        self.oom_score_adj = process.get("oomScoreAdj")


def plan(container_spec: dict[str, Any], process: dict[str, Any], init_pid: int,
         cgroup_dir: str) -> Plan | None:
    """A Plan, or None when the fast path cannot give the process everything runc would."""
    linux = container_spec.get("linux") or {}
    if linux.get("seccomp") or process.get("apparmorProfile") or process.get("selinuxLabel"):
        return None
    if any(ns.get("type") == "user" for ns in linux.get("namespaces") or []):
        return None
    if linux.get("uidMappings") or linux.get("gidMappings"):
        return None
    try:
        return Plan(init_pid, cgroup_dir, process)
    except (KeyError, ValueError, TypeError):
        return None


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _capset(p: Plan) -> None:
    header = struct.pack("<Ii", _CAP_VERSION_3, 0)
    data = struct.pack("<6I", p.effective & 0xFFFFFFFF, p.permitted & 0xFFFFFFFF,
                       p.inheritable & 0xFFFFFFFF, p.effective >> 32, p.permitted >> 32,
                       p.inheritable >> 32)
    _check(_libc.syscall(_SYS_CAPSET, header, data), "capset")


def _become(p: Plan, stdout: int, stderr: int, stdin: int = -1, tty: bool = False) -> None:
    """In the final child: everything after the namespaces, then exec."""
    os.dup2(stdin if stdin >= 0 else os.open("/dev/null", os.O_RDONLY), 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    if tty:
        # A session of its own with the pty (now fd 0) as its controlling terminal, so ^C,
        # SIGWINCH and job control reach it.
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    for kind, soft, hard in p.rlimits:
        resource.setrlimit(kind, (soft, hard))
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(KEEPCAPS)")
    for cap in range(_LAST_CAP + 1):
        if not p.bounding >> cap & 1:
            _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "prctl(CAPBSET_DROP)")
    os.setgroups(p.groups)
    os.setresgid(p.gid, p.gid, p.gid)
    os.setresuid(p.uid, p.uid, p.uid)
    _capset(p)
    for cap in p.ambient:
        _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0), "ambient")
    if p.no_new_privs:
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.chdir(p.cwd)
    os.execvpe(p.argv[0], p.argv, p.env)


def spawn(p: Plan, stdout: int, stderr: int, *, stdin: int = -1,
          tty: bool = False) -> tuple[int, int]:
    """Fork the exec (stdin: /dev/null when -1; tty: stdin is a pty slave to make the
    controlling terminal). Returns (pid of our child, read end of its report pipe). The report pipe
    carries records (see `parse_report`): the exec'd process's pid in the guest, and an error
    if it could not be started; it closes once the process has exec'd (or failed)."""
    ns_fds = []
    try:
        mine = {ns: os.stat(f"/proc/self/ns/{ns}").st_ino for ns in _NAMESPACES}
        for ns in _NAMESPACES:
            path = f"/proc/{p.init_pid}/ns/{ns}"
            if os.stat(path).st_ino != mine[ns]:
                ns_fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        procs = os.open(p.cgroup_procs, os.O_WRONLY | os.O_CLOEXEC)
        ns_fds.append(procs)
    except BaseException:
        for fd in ns_fds:
            os.close(fd)
        raise
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _child(p, ns_fds[:-1], procs, report_w, stdout, stderr, stdin, tty)
    os.close(report_w)
    for fd in ns_fds:
        os.close(fd)
    return pid, report_r


def _child(p: Plan, ns_fds: list[int], procs: int, report: int, stdout: int,
           stderr: int, stdin: int = -1,
           tty: bool = False) -> None:  # pragma: no cover - runs in the child
    code = 127
    try:
        # Forked from the agent: its signal plumbing must not fire here.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGIO):
            signal.signal(sig, signal.SIG_DFL)
        # This child never execs, so O_CLOEXEC does not apply: drop the agent's other fds
        # (an interactive exec's stdin write end, a pty master) or the exec'd process would
        # never see EOF or hang-up while we wait for it.
        _close_all_but([*ns_fds, procs, report, stdout, stderr, stdin])
        os.setsid()
        os.write(procs, b"0")  # into the container's cgroup (children inherit it)
        if p.oom_score_adj is not None:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(p.oom_score_adj))
        for fd in ns_fds:
            _check(_libc.setns(fd, 0), "setns")
        # setns(pid) only applies to children: the process to exec is a grandchild.
        pid = os.fork()
        if pid == 0:
            try:
                _become(p, stdout, stderr, stdin, tty)
            except BaseException as exc:
                _report_error(report, exc)
            os._exit(127)
        os.write(report, b"P" + struct.pack("<i", pid))
        os.close(report)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code
    except BaseException as exc:
        _report_error(report, exc)
    os._exit(code)


def _close_all_but(keep: list[int]) -> None:  # pragma: no cover - runs in the child
    low = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, 1 << 20)


def _report_error(report: int, exc: BaseException) -> None:  # pragma: no cover - in the child
    text = f"{type(exc).__name__}: {exc}".encode()[:1000]
    try:
        os.write(report, b"E" + struct.pack("<H", len(text)) + text)
    except OSError:
        pass


def parse_report(data: bytes) -> tuple[int, str]:
    """(pid of the exec'd process or 0, error text or "") from the report pipe's bytes."""
    pid, errors, i = 0, [], 0
    while i < len(data):
        kind = data[i : i + 1]
        if kind == b"P" and i + 5 <= len(data):
            pid = struct.unpack_from("<i", data, i + 1)[0]
            i += 5
        elif kind == b"E" and i + 3 <= len(data):
            (n,) = struct.unpack_from("<H", data, i + 1)
            errors.append(data[i + 3 : i + 3 + n].decode(errors="replace"))
            i += 3 + n
        else:
            errors.append(f"garbled report {data[i:]!r}")
            break
    return pid, "; ".join(errors)
