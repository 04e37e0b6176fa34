"""The gRPC servicers: thin classes that hand each RPC to the module that implements it, and
answer UNIMPLEMENTED (naming the call) for the container API that comes with the next issue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError

import vmagent
from vmagent import guestinfo
from vmagent.api import agent_pb2 as pb
from vmagent.idempotency import RecentRequests
from vmagent.mapping import mapping_for
from vmagent.pid1 import Reaper

if TYPE_CHECKING:
    from grpclib.server import Stream

log = logging.getLogger("vmagent")


class AgentState:
    """What the servicers share: identity, timings, the reaper, and the shutdown request."""

    def __init__(self, reaper: Reaper, run_dir: str, started_uptime: float) -> None:
        self.reaper = reaper
        self.run_dir = run_dir
        self.instance_id = os.urandom(16).hex()
        # Fixed for the life of the guest: read once, not on every health check.
        self.kernel_release = guestinfo.kernel_release()
        self.boot_id = guestinfo.boot_id()
        self.started_uptime = started_uptime
        self.serving_uptime = 0.0
        self.transport = ""
        self.connections: Callable[[], int] = lambda: 0
        self.sandbox_ready = False
        self.recent = RecentRequests()
        self.shutdown_requested: asyncio.Future[int] = asyncio.get_running_loop().create_future()


class HealthService:
    def __init__(self, state: AgentState) -> None:
        self._s = state

    def __mapping__(self) -> dict[str, Handler]:
        return mapping_for("Health", self)

    async def Check(self, stream: Stream[pb.CheckRequest, pb.CheckResponse]) -> None:
        await stream.recv_message()
        s = self._s
        await stream.send_message(pb.CheckResponse(
            agent_version=vmagent.__version__, agent_instance_id=s.instance_id,
            kernel_release=s.kernel_release, boot_id=s.boot_id,
            boot_time_unix_nanos=guestinfo.boot_time_ns(), uptime_seconds=guestinfo.uptime(),
            agent_started_uptime_seconds=s.started_uptime,
            agent_serving_uptime_seconds=s.serving_uptime, transport=s.transport,
            connection_serial=s.connections(), sandbox_ready=s.sandbox_ready,
            agent_pid=os.getpid()))


def _unimplemented(name: str) -> GRPCError:
    return GRPCError(Status.UNIMPLEMENTED, f"Agent.{name} is not implemented yet")


class AgentService:
    def __init__(self, state: AgentState) -> None:
        self._s = state

    def __mapping__(self) -> dict[str, Handler]:
        return mapping_for("Agent", self)

    async def _unary(self, stream: Stream[Any, Any], name: str) -> None:
        # Answered before the request is read: a trailers-only UNIMPLEMENTED reply.
        raise _unimplemented(name)

    _streaming = _unary

    # --- sandbox -----------------------------------------------------------------------------

    async def SetupSandbox(
        self, stream: Stream[pb.SetupSandboxRequest, pb.SetupSandboxResponse]
    ) -> None:
        from vmagent.sandbox import setup_sandbox

        req = await stream.recv_message()
        assert req is not None

        async def work() -> pb.SetupSandboxResponse:
            resp = setup_sandbox(req, self._s.run_dir)
            self._s.sandbox_ready = True
            return resp

        await stream.send_message(await self._s.recent.run("SetupSandbox", req.request_id, work))

    async def Shutdown(self, stream: Stream[pb.ShutdownRequest, pb.Empty]) -> None:
        req = await stream.recv_message()
        assert req is not None
        log.info("shutdown requested action=%s", pb.ShutdownRequest.Action.Name(req.action))
        await stream.send_message(pb.Empty())
        await stream.send_trailing_metadata()
        if not self._s.shutdown_requested.done():
            self._s.shutdown_requested.set_result(req.action)

    async def Stats(self, stream: Stream[pb.StatsRequest, pb.StatsResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None
        if req.container_ids:
            raise GRPCError(Status.NOT_FOUND,
                            f"Agent.Stats: unknown containers {list(req.container_ids)}")
        mem = guestinfo.meminfo()
        load1, procs = guestinfo.loadavg()
        await stream.send_message(pb.StatsResponse(guest=pb.GuestStats(
            timestamp_unix_nanos=time.time_ns(), memory_total_bytes=mem.get("MemTotal", 0),
            memory_available_bytes=mem.get("MemAvailable", 0),
            cpu_usage_nanos=guestinfo.cpu_usage_ns(), load1=load1, processes=procs)))

    # --- processes ---------------------------------------------------------------------------

    async def ExecSync(self, stream: Stream[pb.ExecSyncRequest, pb.ExecSyncResponse]) -> None:
        from vmagent.execsync import exec_sync

        req = await stream.recv_message()
        assert req is not None
        resp = await self._s.recent.run(
            "ExecSync", req.request_id, lambda: exec_sync(req, self._s.reaper))
        await stream.send_message(resp)

    # --- not yet (issue 4) ---------------------------------------------------------------------

    async def CreateContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "CreateContainer")

    async def StartContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "StartContainer")

    async def SignalContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "SignalContainer")

    async def WaitContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "WaitContainer")

    async def DeleteContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "DeleteContainer")

    async def GetContainerState(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "GetContainerState")

    async def ListContainers(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "ListContainers")

    async def PauseContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "PauseContainer")

    async def ResumeContainer(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "ResumeContainer")

    async def UpdateResources(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "UpdateResources")

    async def Exec(self, stream: Stream[Any, Any]) -> None:
        await self._streaming(stream, "Exec")

    async def Attach(self, stream: Stream[Any, Any]) -> None:
        await self._streaming(stream, "Attach")

    async def ReadStdio(self, stream: Stream[Any, Any]) -> None:
        await self._unary(stream, "ReadStdio")

    async def PortForward(self, stream: Stream[Any, Any]) -> None:
        await self._streaming(stream, "PortForward")
