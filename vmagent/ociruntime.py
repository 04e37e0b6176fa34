"""Running the guest's OCI runtime (crun, or runc) from the agent without blocking the event
loop: fork/exec, the exit status from the PID-1 reaper, output read on the loop. Errors name
the command and carry the runtime's own message (from its stderr, or from its JSON log when
stderr belongs to the container).

crun is preferred: both implement the same OCI spec and command line, but runc is Go, and
under TCG each runc process pays for starting the Go runtime (twice for `create`, whose
`runc init` is Go too): measured in a pod's first container, runc create took 1.6 s and
crun create 0.5 s (docs/benchmarks.md "Less work in the guest").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.execsync import Capture, kill_pid
from vmagent.pid1 import ChildExit, Reaper

log = logging.getLogger("vmagent")

CANDIDATES = {
    "crun": ("/usr/bin/crun", "/usr/sbin/crun"),
    "runc": ("/usr/sbin/runc", "/usr/bin/runc", "/sbin/runc"),
}
STATE_ROOT = "/run/runc"
_OUTPUT_LIMIT = 1024 * 1024


def runtime_binary(choice: str = "auto") -> str:
    """The runtime to run: `choice` is "auto" (crun when the guest has it, else runc), "crun",
    "runc" or a path."""
    if choice.startswith("/"):
        return choice
    names = ("crun", "runc") if choice == "auto" else (choice,)
    for name in names:
        for path in CANDIDATES.get(name, ()):
            if os.access(path, os.X_OK):
                return path
    return names[-1]


class OciRuntimeError(GRPCError):
    """The runtime exited non-zero; `code` is its exit code."""

    def __init__(self, status: Status, message: str, code: int) -> None:
        super().__init__(status, message)
        self.code = code


def spawn(argv: list[str], stdin: int | None, stdout: int, stderr: int,
          env: dict[str, str] | None = None) -> int:
    """fork/exec only (the reaper collects the status); returns the pid."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
                            stdout=stdout, stderr=stderr, close_fds=True, env=env)
    proc.returncode = 0  # never let Popen wait for it: the reaper owns exit statuses
    pid: int = proc.pid
    return pid


def _log_message(path: str) -> str:
    """Last error lines of the runtime's JSON log (runc's and crun's have the same fields)."""
    try:
        with open(path, errors="replace") as f:  # tmpfs
            lines = f.read().splitlines()[-20:]
    except OSError:
        return ""
    msgs = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            msgs.append(line)
            continue
        if entry.get("level") in ("error", "fatal", "warning"):
            msgs.append(str(entry.get("msg", "")))
    return "; ".join(m for m in msgs if m)[-2000:]


class OciRuntime:
    """One runtime binary and state root; every call is one short-lived runtime process.

    `launcher`: argv the runtime is run through for calls that start no workload process
    (vmexec's fixed-addresses under TCG, see guest/vmexec.c); the container's own init gets
    its personality from the spec."""

    def __init__(self, reaper: Reaper, binary: str | None = None, root: str = STATE_ROOT,
                 launcher: tuple[str, ...] = ()) -> None:
        self.reaper = reaper
        self.binary = binary or runtime_binary()
        self.name = os.path.basename(self.binary)
        self.root = root
        self.launcher = launcher

    async def run(self, args: list[str], *, what: str, stdout: int | None = None,
                  stderr: int | None = None, log_path: str | None = None,
                  stdin: int | None = None) -> bytes:
        """Run `<runtime> <args>`; returns its stdout (when not redirected).

        :raises OciRuntimeError: when it fails (status from `_status_for`).
        """
        status, out, err = await self.run_status(args, what=what, stdout=stdout, stderr=stderr,
                                                 log_path=log_path, stdin=stdin)
        if status.code != 0:
            detail = err or (_log_message(log_path) if log_path else "")
            raise OciRuntimeError(_status_for(detail),
                                  f"{what}: {self.name} exited {status.code}: {detail}",
                                  status.code)
        return out

    async def run_status(self, args: list[str], *, what: str, stdout: int | None = None,
                         stderr: int | None = None, log_path: str | None = None,
                         close_after_spawn: tuple[int, ...] = (), stdin: int | None = None,
                         workload: bool = False) -> tuple[ChildExit, bytes, str]:
        """Run `<runtime> <args>` to its end: (exit, stdout, stderr text) for those not
        redirected. `close_after_spawn`: the caller's fds (pipe write ends) that only the
        runtime keeps open. `stdin`: its stdin (a container's stdin pipe); /dev/null when None.
        `workload`: the call starts a process of the container's (exec), which inherits the
        runtime's personality: never through the launcher. Cancelling kills it."""
        argv = [*(() if workload else self.launcher), self.binary, "--root", self.root]
        if log_path:
            argv += ["--log", log_path, "--log-format", "json"]
        argv += args
        loop = asyncio.get_running_loop()
        out_r = err_r = -1
        fds_to_close = list(close_after_spawn)
        if stdout is None:
            out_r, stdout = os.pipe2(os.O_CLOEXEC)
            fds_to_close.append(stdout)
        if stderr is None:
            err_r, stderr = os.pipe2(os.O_CLOEXEC)
            fds_to_close.append(stderr)
        try:
            pid = spawn(argv, stdin, stdout, stderr)
        except OSError as exc:
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            raise GRPCError(Status.INTERNAL, f"{what}: cannot run {self.name}: {exc}") from exc
        finally:
            for fd in fds_to_close:
                os.close(fd)
        exited = self.reaper.watch(pid)
        out = Capture(loop, out_r, _OUTPUT_LIMIT) if out_r >= 0 else None
        err = Capture(loop, err_r, _OUTPUT_LIMIT) if err_r >= 0 else None
        try:
            status: ChildExit = await asyncio.shield(exited)
            waits = {c.eof for c in (out, err) if c is not None}
            if waits:
                # The runtime's own output ends when it exits (it hands no pipe of ours on).
                await asyncio.wait(waits, timeout=1.0)
        except asyncio.CancelledError:
            kill_pid(pid)
            raise
        finally:
            for c in (out, err):
                if c is not None:
                    c.close()
        return (status, bytes(out.data) if out is not None else b"",
                bytes(err.data).decode(errors="replace").strip() if err is not None else "")


def log_errors(log_path: str) -> str:
    """The runtime's error messages from its JSON log ("" if none)."""
    return _log_message(log_path)


def _status_for(detail: str) -> Status:
    lowered = detail.lower()
    # runc: "container does not exist"; crun: "error opening file `<root>/<id>/status`: No such
    # file or directory".
    if "does not exist" in lowered or ("not found" in lowered and "container" in lowered) or (
            "/status" in lowered and "no such file" in lowered):
        return Status.NOT_FOUND
    # runc: "container not running", "already exists"; crun: "not in created state".
    if "not running" in lowered or "already" in lowered or "not in created state" in lowered:
        return Status.FAILED_PRECONDITION
    return Status.INTERNAL
