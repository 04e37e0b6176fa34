"""ExecSync inside a container: the container's namespaces, cgroup, capabilities, no_new_privs,
rlimits, seccomp filter (and, through the OCI runtime, its AppArmor profile), with the
request's argv and (when given) env, cwd and user. The vmexec fast path (fastexec) runs when
the spec allows it, the OCI runtime's exec otherwise. A timeout kills the exec'd process (not
just its parent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.containers import Containers
from vmagent.execsync import DEFAULT_OUTPUT_LIMIT, Capture, kill_pid
from vmagent.fdio import read_chunk
from vmagent.ociruntime import log_errors
from vmagent.ocispec import exec_process
from vmagent.pid1 import ChildExit

log = logging.getLogger("vmagent")

_DRAIN_AFTER_EXIT = 0.5
_RUNNING = pb.ContainerState.RUNNING


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:  # tmpfs
            text = f.read().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:  # tmpfs, a few KiB
        f.write(text)


def _remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def plan_exec(containers: Containers, container_id: str, p: pb.Process
              ) -> tuple[Any, dict[str, Any] | None, Any | None]:
    """For an exec in a running container: the container, the exec's OCI process (the
    container's own security settings with the exec's argv/env/cwd/user) for the runtime's exec, and
    the fast path's plan when the spec allows one (then the process may be None)."""
    c = containers.get(container_id)
    if c.status != _RUNNING:
        raise GRPCError(Status.FAILED_PRECONDITION,
                        f"container {c.id} is {pb.ContainerState.Status.Name(c.status)}, "
                        "not RUNNING")
    # CRI execs give only argv: their plan is the container's, planned once (~3 ms under TCG).
    as_container = not (p.env or p.cwd or p.HasField("user"))
    if as_container and c.exec_plan is not None:
        return c, None, c.exec_plan.with_argv(list(p.argv))
    user = None
    if p.HasField("user"):
        user = (p.user.uid, p.user.gid, list(p.user.additional_gids))
    process = exec_process(c.spec, list(p.argv), list(p.env), p.cwd, user)
    fast = None
    if containers.exec_mode != "runtime":
        from vmagent import fastexec

        fast = fastexec.plan(c.spec, process, c.pid, c.cgroup_dir,
                             containers.vmexec or fastexec.DEFAULT_VMEXEC)
        if as_container:
            c.exec_plan = fast
    return c, process, fast


async def start_fast(containers: Containers, container_id: str, plan: Any, stdout: int,
                     stderr: int, *, stdin: int = -1, tty: bool = False
                     ) -> tuple[int, asyncio.Future[ChildExit]]:
    """Start an exec through vmexec: (the process's pid, its exit). The seccomp filter is
    compiled on first use. Cancelling kills whatever was started."""
    from vmagent import fastexec

    c = containers.get(container_id)
    if plan.seccomp_rules and not c.exec_filter:
        c.exec_filter = await fastexec.compile_filter(plan, containers.reaper)
        # The container may have exited while we waited: never setns into a reused pid.
        plan_exec(containers, container_id, pb.Process(argv=["-"]))
    try:
        helper, report_r = fastexec.spawn(plan, stdout, stderr, stdin=stdin, tty=tty,
                                          seccomp_filter=c.exec_filter)
    except OSError as exc:
        raise GRPCError(Status.FAILED_PRECONDITION,
                        f"container {c.id}: exec: cannot enter the container: {exc}") from exc
    containers.reaper.watch(helper)  # vmexec exits once the process runs; nothing to learn
    report = bytearray()
    try:
        os.set_blocking(report_r, False)
        # The report pipe closes once the process has exec'd (or failed to).
        while chunk := await read_chunk(report_r):
            report += chunk
    except BaseException:
        kill_pid(fastexec.parse_report(bytes(report))[0] or helper, signal.SIGKILL)
        raise
    finally:
        os.close(report_r)
    target, error = fastexec.parse_report(bytes(report))
    exited = containers.reaper.watch(target) if target > 0 else None
    if error or exited is None:
        if exited is not None:
            await exited
        raise GRPCError(Status.FAILED_PRECONDITION, f"container {c.id}: exec "
                        f"{plan.argv[0]!r} failed: {error or 'vmexec reported nothing'}")
    return target, exited


async def exec_in_container(req: pb.ExecSyncRequest, containers: Containers
                            ) -> pb.ExecSyncResponse:
    if not req.process.argv:
        raise GRPCError(Status.INVALID_ARGUMENT, "ExecSync: empty argv")
    p = req.process
    c, process, fast = plan_exec(containers, req.container_id, p)
    if fast is not None:
        return await _exec_fast(req, containers, fast)
    assert process is not None
    c.exec_serial += 1
    base = os.path.join(c.bundle, f"exec-{c.exec_serial}")
    proc_file, pid_file, log_file = base + ".json", base + ".pid", base + ".log"
    _write(proc_file, json.dumps(process))
    limit = req.output_limit_bytes or DEFAULT_OUTPUT_LIMIT
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    stdout = Capture(loop, out_r, limit)
    stderr = Capture(loop, err_r, limit)
    t0 = time.monotonic()
    run = asyncio.ensure_future(containers.runtime.run_status(
        ["exec", "--process", proc_file, "--pid-file", pid_file, c.id],
        what=f"container {c.id}: exec", stdout=out_w, stderr=err_w, log_path=log_file,
        close_after_spawn=(out_w, err_w), workload=True))
    timed_out = False
    try:
        try:
            status, _, _ = await asyncio.wait_for(asyncio.shield(run),
                                                  req.timeout_seconds or None)
        except TimeoutError:
            timed_out = True
            _kill_exec(pid_file, run)
            try:
                status, _, _ = await run
            except asyncio.CancelledError:
                status = ChildExit(signal.SIGKILL)  # the runtime was killed before the exec
        await asyncio.wait({stdout.eof, stderr.eof}, timeout=_DRAIN_AFTER_EXIT)
    except asyncio.CancelledError:
        _kill_exec(pid_file, run)
        raise
    finally:
        stdout.close()
        stderr.close()
        started = _read_pid(pid_file) > 0
        errors = "" if started else log_errors(log_file)
        await asyncio.to_thread(_remove, proc_file, pid_file, log_file)
    if not started and status.code != 0 and not timed_out:
        # the runtime could not start the process at all (no such binary, bad cwd, ...).
        raise GRPCError(Status.FAILED_PRECONDITION,
                        f"container {c.id}: exec {p.argv[0]!r} failed: {errors or status.code}")
    # `<runtime> exec` exits with the process's code, or 128+signal when a signal killed it.
    sig = status.code - 128 if status.code > 128 and timed_out else 0
    log.debug("exec done id=%s argv0=%s code=%d seconds=%.3f", c.id, p.argv[0], status.code,
              time.monotonic() - t0)
    return pb.ExecSyncResponse(
        stdout=bytes(stdout.data), stderr=bytes(stderr.data), exit_code=status.code,
        signal=sig, timed_out=timed_out, stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated)


def _kill_exec(pid_file: str, run: asyncio.Future[Any]) -> None:
    pid = _read_pid(pid_file)
    if pid:
        kill_pid(pid, signal.SIGKILL)
    else:
        run.cancel()  # not started yet: killing the runtime keeps it from starting


async def _exec_fast(req: pb.ExecSyncRequest, containers: Containers, plan: Any
                     ) -> pb.ExecSyncResponse:
    limit = req.output_limit_bytes or DEFAULT_OUTPUT_LIMIT
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    stdout = Capture(loop, out_r, limit)
    stderr = Capture(loop, err_r, limit)
    timeout = req.timeout_seconds or None
    deadline = loop.time() + timeout if timeout else None
    timed_out = False
    try:
        try:
            pid, exited = await asyncio.wait_for(
                start_fast(containers, req.container_id, plan, out_w, err_w), timeout)
        except TimeoutError:  # killed before it could start
            return pb.ExecSyncResponse(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL,
                                       timed_out=True)
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            status: ChildExit = await asyncio.wait_for(asyncio.shield(exited), left)
        except TimeoutError:
            timed_out = True
            kill_pid(pid, signal.SIGKILL)
            status = await exited
        except asyncio.CancelledError:
            kill_pid(pid, signal.SIGKILL)
            raise
        await asyncio.wait({stdout.eof, stderr.eof}, timeout=_DRAIN_AFTER_EXIT)
    finally:
        stdout.close()
        stderr.close()
    return pb.ExecSyncResponse(
        stdout=bytes(stdout.data), stderr=bytes(stderr.data), exit_code=status.code,
        signal=status.signal if timed_out else 0, timed_out=timed_out,
        stdout_truncated=stdout.truncated, stderr_truncated=stderr.truncated)
