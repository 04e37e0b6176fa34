"""Running runc from the agent without blocking the event loop: fork/exec, the exit status
from the PID-1 reaper, output read on the loop. Errors name the runc command and carry runc's
own message (from its stderr, or from its JSON log when stderr belongs to the container).
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

RUNC_CANDIDATES = ("/usr/sbin/runc", "/usr/bin/runc", "/sbin/runc")
RUNC_ROOT = "/run/runc"
_OUTPUT_LIMIT = 1024 * 1024


def runc_binary() -> str:
    for path in RUNC_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return "runc"


class RuncError(GRPCError):
    """runc exited non-zero; `code` is its exit code."""

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
    """Last error lines of runc's JSON log."""
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


class Runc:
    """One runc binary and state root; every call is one short-lived runc process."""

    def __init__(self, reaper: Reaper, binary: str | None = None, root: str = RUNC_ROOT) -> None:
        self.reaper = reaper
        self.binary = binary or runc_binary()
        self.root = root

    async def run(self, args: list[str], *, what: str, stdout: int | None = None,
                  stderr: int | None = None, log_path: str | None = None,
                  stdin: int | None = None) -> bytes:
        """Run `runc <args>`; returns its stdout (when not redirected).

        :raises RuncError: when runc fails (status from `_status_for`).
        """
        status, out, err = await self.run_status(args, what=what, stdout=stdout, stderr=stderr,
                                                 log_path=log_path, stdin=stdin)
        if status.code != 0:
            detail = err or (_log_message(log_path) if log_path else "")
            raise RuncError(_status_for(detail), f"{what}: runc exited {status.code}: {detail}",
                            status.code)
        return out

    async def run_status(self, args: list[str], *, what: str, stdout: int | None = None,
                         stderr: int | None = None, log_path: str | None = None,
                         close_after_spawn: tuple[int, ...] = (), stdin: int | None = None,
                         ) -> tuple[ChildExit, bytes, str]:
        """Run `runc <args>` to its end: (exit, stdout, stderr text) for those not redirected.
        `close_after_spawn`: the caller's fds (pipe write ends) that only runc keeps open.
        `stdin`: runc's stdin (a container's stdin pipe); /dev/null when None.
        Cancelling kills runc."""
        argv = [self.binary, "--root", self.root]
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
            raise GRPCError(Status.INTERNAL, f"{what}: cannot run runc: {exc}") from exc
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
                # runc's own output ends when it exits (it hands no pipe of ours on).
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
    """runc's error messages from its JSON log ("" if none)."""
    return _log_message(log_path)


def _status_for(detail: str) -> Status:
    lowered = detail.lower()
    if "does not exist" in lowered or ("not found" in lowered and "container" in lowered):
        return Status.NOT_FOUND
    if "not running" in lowered or "already" in lowered:
        return Status.FAILED_PRECONDITION
    return Status.INTERNAL
