"""CNI plugins that a previous daemon started and did not see finish.

A daemon killed during CNI ADD leaves its plugins running: they are separate processes, and the
unit's KillMode=process (which keeps the VMs alive) spares them. The next daemon cleans the
half-made pod up with DEL; an ADD that finished after that DEL would leave an address, a veth
and NAT rules that no pod owns. So before it runs a plugin of its own, the daemon waits for its
predecessor's, and kills those still running after the plugin timeout (DEL then removes what
they had made). They are told apart from other runtimes' plugins by OWNER_ENV, which every
plugin this CNI cache runs gets in its environment (plugins ignore variables they do not know).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_ENV = "CRISERVER_CNI_CACHE"


def owner_env(cache_dir: Path) -> dict[str, str]:
    """The variable that marks a plugin as run for this CNI cache."""
    return {OWNER_ENV: str(cache_dir)}


def _is_owned(pid: str, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:  # gone, or a kernel thread
        return False


def find(cache_dir: Path) -> list[int]:
    """PIDs of running processes started as plugins for cache_dir (and their children, which
    inherit the variable). Blocking: reads every process's environment."""
    marker = f"{OWNER_ENV}={cache_dir}".encode()
    me = str(os.getpid())
    return [int(e.name) for e in os.scandir("/proc")
            if e.name.isdigit() and e.name != me and _is_owned(e.name, marker)]


def _open(pids: list[int], cache_dir: Path) -> dict[int, int]:
    """pidfds of those still running and still ours (checked after the open: a pidfd cannot
    follow a recycled pid)."""
    marker = f"{OWNER_ENV}={cache_dir}".encode()
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
            if _is_owned(str(pid), marker):
                fds[pid] = fd
            else:
                os.close(fd)
    return fds


def _wait(fds: dict[int, int], timeout: float) -> set[int]:
    """Wait until every process has exited or timeout passed; the PIDs still running."""
    running = dict(fds)
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in running.values():
        poller.register(fd, select.POLLIN)
    by_fd = {fd: pid for pid, fd in running.items()}
    while running and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            running.pop(by_fd[fd], None)
    return set(running)


async def settle(cache_dir: Path, timeout: float) -> None:
    """Wait for the plugins a previous daemon left running for cache_dir, at most timeout
    seconds, then kill the rest. A failure to look is logged: it must not stop CNI."""
    try:
        await _settle(cache_dir, timeout)
    except OSError:
        log.exception("looking for CNI plugins a previous daemon left running failed")


async def _settle(cache_dir: Path, timeout: float) -> None:
    pids = await asyncio.to_thread(find, cache_dir)
    if not pids:
        return
    fds = await asyncio.to_thread(_open, pids, cache_dir)
    try:
        if not fds:
            return
        log.warning("waiting for CNI plugins a previous daemon left running pids=%s timeout=%gs",
                    sorted(fds), timeout)
        for pid in await asyncio.to_thread(_wait, fds, timeout):
            log.warning("killing CNI plugin a previous daemon left running pid=%s", pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fds[pid], signal.SIGKILL)
        await asyncio.to_thread(_wait, fds, 5.0)  # the kills take effect
    finally:
        for fd in fds.values():
            os.close(fd)
