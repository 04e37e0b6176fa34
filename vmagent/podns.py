"""The pod's shared namespaces. A VM is one pod, so its IPC and UTS namespaces are the VM's own,
which the agent is in: SetupSandbox sets the pod's hostname and sysctls there, and containers
join them through the agent's /proc/<pid>/ns/<kind>, with nothing to start. Containers keep the
VM's network namespace too.
A pod with a user namespace needs a holder process instead, which owns that user namespace and
an IPC and a UTS namespace created in it: namespaces a container joins from inside a user
namespace must belong to it (setns, and mounting mqueue and procfs). A container asking for a
pod-wide PID namespace gets a holder that is PID 1 there and reaps orphans (`vmexec pid1`).
"""

from __future__ import annotations

import asyncio
import logging
import os

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.idmap import IdMaps, write_maps
from vmagent.ociruntime import spawn
from vmagent.pid1 import Reaper

log = logging.getLogger("vmagent")

_FOREVER = "2147483647"
_START_TIMEOUT = 10.0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:  # procfs
            return f.read().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:  # procfs
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class PodNamespaces:
    def __init__(self, reaper: Reaper, vmexec: str) -> None:
        self._reaper = reaper
        self._vmexec = vmexec  # its `pid1` is the PID namespace's init
        self._lock = asyncio.Lock()
        self.holder_pid = 0
        self.pid_holder_pid = 0
        self.id_maps: IdMaps | None = None  # the pod's user namespace, owned by the holder
        self._chosen = False  # a container has joined: with id_maps, or in the VM's namespaces
        # /proc/<pid>/comm of that init: the name it was exec'd by, cut to 15 chars.
        self._pid1_comm = os.path.basename(vmexec)[:15]

    async def _start(self, argv: list[str], ready_comm: str, nested: bool) -> int:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            pid = spawn(argv, None, devnull, devnull)
        finally:
            os.close(devnull)
        exited = self._reaper.watch(pid)
        deadline = asyncio.get_running_loop().time() + _START_TIMEOUT
        # Ready once the holder has exec'd its program: unshare(2) ran before that exec.
        while True:
            if exited.done():
                raise GRPCError(Status.INTERNAL, f"namespace holder {argv} exited at once")
            target = _children(pid)[:1] if nested else [pid]
            if target and _comm(target[0]) == ready_comm:
                return target[0]
            if asyncio.get_running_loop().time() > deadline:
                raise GRPCError(Status.DEADLINE_EXCEEDED, f"namespace holder {argv} not ready")
            await asyncio.sleep(0.005)

    async def ipc_uts(self, id_maps: IdMaps | None = None) -> int:
        """Pid of the process whose IPC and UTS namespaces the pod's containers join: the
        agent, or with `id_maps` the holder of the pod's user namespace, started on first use
        (it copies the guest's hostname, which SetupSandbox has set by then). All containers
        of a pod have the same mappings (or none)."""
        async with self._lock:
            if self._chosen and id_maps != self.id_maps:
                raise GRPCError(Status.FAILED_PRECONDITION,
                                "the pod's containers must all share its user namespace")
            if id_maps is None:
                self._chosen = True
                return os.getpid()
            if self.holder_pid and _comm(self.holder_pid) == "sleep":
                return self.holder_pid
            argv = ["unshare", "--user", "--ipc", "--uts", "--", "sleep", _FOREVER]
            pid = await self._start(argv, "sleep", nested=False)
            try:
                await asyncio.to_thread(write_maps, pid, id_maps)
            except OSError as exc:
                os.kill(pid, 9)
                raise GRPCError(Status.INVALID_ARGUMENT,
                                f"user namespace mappings: {exc.strerror}") from exc
            self.holder_pid, self.id_maps, self._chosen = pid, id_maps, True
            log.info("pod user namespace holder started pid=%d", pid)
            return pid

    async def pid(self) -> int:
        """Pid (in the guest) of PID 1 of the pod's shared PID namespace."""
        async with self._lock:
            if self.pid_holder_pid and _comm(self.pid_holder_pid) == self._pid1_comm:
                return self.pid_holder_pid
            argv = [self._vmexec, "pid1"]
            if self.id_maps is not None and self.holder_pid:
                # Owned by the pod's user namespace, or its containers could not join it.
                argv[:0] = ["nsenter", f"--user=/proc/{self.holder_pid}/ns/user", "--"]
            self.pid_holder_pid = await self._start(argv, self._pid1_comm, nested=True)
            log.info("pod pid namespace holder started pid=%d", self.pid_holder_pid)
            return self.pid_holder_pid
