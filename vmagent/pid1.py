"""PID-1 duties: reap every child (orphans included), hand exit statuses to whoever waits for a
pid, and power the VM off with reboot(2). Outside a VM (tests) the agent makes itself a child
subreaper so orphaned grandchildren still come back to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict

log = logging.getLogger("vmagent")

# Exits of pids nobody watches yet: `runc create` reparents the container's init to us, and it
# can exit before the caller learns its pid from runc's pid file.
_UNCLAIMED_MAX = 256

# reboot(2) commands (sys/reboot.h); glibc's wrapper adds the magic numbers.
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
_PR_SET_CHILD_SUBREAPER = 36


class ChildExit:
    """How a child ended: `code` for exit(), `signal` for a kill (then code is 128+signal)."""

    __slots__ = ("code", "finished_at_ns", "signal")

    def __init__(self, status: int) -> None:
        self.finished_at_ns = time.time_ns()
        if os.WIFSIGNALED(status):
            self.signal = os.WTERMSIG(status)
            self.code = 128 + self.signal
        else:
            self.signal = 0
            self.code = os.waitstatus_to_exitcode(status)


class Reaper:
    """Collects every exited child on SIGCHLD with waitpid(-1); one owner for all exit statuses,
    so nothing else in the agent may call waitpid (asyncio subprocesses are therefore not used).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[int, asyncio.Future[ChildExit]] = {}
        self._unclaimed: OrderedDict[int, ChildExit] = OrderedDict()

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def watch(self, pid: int) -> asyncio.Future[ChildExit]:
        """Future for pid's exit. Call it right after spawning, before yielding to the loop."""
        fut = self._waiters.get(pid)
        if fut is None:
            fut = self._loop.create_future()
            done = self._unclaimed.pop(pid, None)
            if done is not None:
                fut.set_result(done)
            else:
                self._waiters[pid] = fut
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exit_ = ChildExit(status)
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(exit_)
                continue
            self._unclaimed[pid] = exit_
            if len(self._unclaimed) > _UNCLAIMED_MAX:
                self._unclaimed.popitem(last=False)
            log.debug("reaped pid=%d code=%d", pid, exit_.code)


def _libc() -> object:
    import ctypes  # only on the rare paths below: ctypes costs tens of ms under TCG

    return ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Adopt orphaned descendants (needed when the agent is not PID 1)."""
    if os.getpid() == 1:
        return
    libc = _libc()
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # type: ignore[attr-defined]
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed")


def power_off(action: int = RB_POWER_OFF) -> None:
    """sync, then reboot(2): ends the VM (QEMU exits with -no-reboot). Does not return."""
    os.sync()
    libc = _libc()
    libc.reboot(action)  # type: ignore[attr-defined]
    # Only reached without CAP_SYS_BOOT: nothing sensible is left to do.
    log.error("reboot(2) failed; exiting")
    os._exit(1)
