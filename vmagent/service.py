"""The gRPC servicers: thin classes that hand each RPC to the module that implements it.
Container and stream modules are imported on first use: they are not needed for the first
health answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from grpclib.const import Handler

import vmagent
from vmagent import guestinfo
from vmagent.api import agent_pb2 as pb
from vmagent.idempotency import RecentRequests
from vmagent.mapping import mapping_for
from vmagent.pid1 import Reaper
from vmagent.steps import span

if TYPE_CHECKING:
    from grpclib.server import Stream

    from vmagent.containers import Containers

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
        self._containers: Containers | None = None
        self.exec_mode = "auto"
        self.vmexec = ""
        self.oci_runtime = "auto"
        self.runtime_fixed_addresses = False

    @property
    def containers(self) -> Containers:
        if self._containers is None:
            from vmagent.containers import Containers

            self._containers = Containers(self.reaper, self.run_dir, self.exec_mode,
                                          self.vmexec, self.oci_runtime,
                                          self.runtime_fixed_addresses)
        return self._containers


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


class AgentService:
    def __init__(self, state: AgentState) -> None:
        self._s = state

    def __mapping__(self) -> dict[str, Handler]:
        return mapping_for("Agent", self)

    # --- sandbox -----------------------------------------------------------------------------

    async def SetupSandbox(
        self, stream: Stream[pb.SetupSandboxRequest, pb.SetupSandboxResponse]
    ) -> None:
        from vmagent.sandbox import setup_sandbox

        req = await stream.recv_message()
        assert req is not None

        async def work() -> pb.SetupSandboxResponse:
            with span("files"):
                resp = setup_sandbox(req, self._s.run_dir)
            if req.interfaces:
                from vmagent.network import configure

                with span("network"):
                    await asyncio.to_thread(configure, list(req.interfaces))
            self._s.sandbox_ready = True
            return resp

        await stream.send_message(await self._s.recent.run("SetupSandbox", req.request_id, work))

    async def Shutdown(self, stream: Stream[pb.ShutdownRequest, pb.Empty]) -> None:
        req = await stream.recv_message()
        assert req is not None
        log.info("shutdown requested action=%s", pb.ShutdownRequest.Action.Name(req.action))
        # Synced before the answer: the host may end the VM as soon as it has it.
        await asyncio.to_thread(os.sync)
        await stream.send_message(pb.Empty())
        await stream.send_trailing_metadata()
        if not self._s.shutdown_requested.done():
            self._s.shutdown_requested.set_result(req.action)

    async def Stats(self, stream: Stream[pb.StatsRequest, pb.StatsResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None
        containers = await self._s.containers.stats(list(req.container_ids), req.details)
        mem = guestinfo.meminfo()
        load1, procs = guestinfo.loadavg()
        reply = pb.StatsResponse(guest=pb.GuestStats(
            timestamp_unix_nanos=time.time_ns(), memory_total_bytes=mem.get("MemTotal", 0),
            memory_available_bytes=mem.get("MemAvailable", 0),
            cpu_usage_nanos=guestinfo.cpu_usage_ns(), load1=load1, processes=procs),
            containers=containers)
        from vmagent.metrics import interfaces

        # Always, details or not: one /proc read for PodSandboxStats.linux.network.
        reply.interfaces.extend(interfaces(self._s.containers.network_pid()))
        await stream.send_message(reply)

    # --- processes ---------------------------------------------------------------------------

    async def ExecSync(self, stream: Stream[pb.ExecSyncRequest, pb.ExecSyncResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None

        async def work() -> pb.ExecSyncResponse:
            if req.container_id:
                from vmagent.container_exec import exec_in_container

                return await exec_in_container(req, self._s.containers)
            from vmagent.execsync import exec_sync

            return await exec_sync(req, self._s.reaper)

        await stream.send_message(await self._s.recent.run("ExecSync", req.request_id, work))

    # --- containers --------------------------------------------------------------------------

    async def CreateContainer(
        self, stream: Stream[pb.CreateContainerRequest, pb.ContainerState]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await self._s.recent.run(
            "CreateContainer", req.request_id, lambda: self._s.containers.create(req)))

    async def StartContainer(
        self, stream: Stream[pb.StartContainerRequest, pb.ContainerState]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await self._s.recent.run(
            "StartContainer", req.request_id,
            lambda: self._s.containers.start(req.container_id)))

    async def SignalContainer(self, stream: Stream[pb.SignalContainerRequest, pb.Empty]) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self._s.containers.signal(req)
        await stream.send_message(pb.Empty())

    async def WaitContainer(
        self, stream: Stream[pb.WaitContainerRequest, pb.ExitStatus]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(await self._s.containers.wait(req))

    async def DeleteContainer(self, stream: Stream[pb.DeleteContainerRequest, pb.Empty]) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self._s.containers.delete(req)
        await stream.send_message(pb.Empty())

    async def GetContainerState(
        self, stream: Stream[pb.ContainerRequest, pb.ContainerState]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await stream.send_message(self._s.containers.get(req.container_id).state())

    async def UpdateResources(self, stream: Stream[pb.UpdateResourcesRequest, pb.Empty]) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self._s.containers.update(req)
        await stream.send_message(pb.Empty())

    async def ReadStdio(self, stream: Stream[pb.ReadStdioRequest, pb.StdioChunk]) -> None:
        from vmagent.stdio_service import read_stdio

        req = await stream.recv_message()
        assert req is not None
        await read_stdio(req, self._s.containers.get(req.container_id).output,
                         stream.send_message)

    # --- interactive streams ---------------------------------------------------------------

    async def Exec(self, stream: Stream[pb.StdioInput, pb.StdioOutput]) -> None:
        from vmagent.exec_stream import serve_exec

        await serve_exec(stream, self._s.reaper, lambda: self._s.containers)

    async def Attach(self, stream: Stream[pb.StdioInput, pb.StdioOutput]) -> None:
        from vmagent.attach import serve_attach

        await serve_attach(stream, self._s.containers)

    async def PortForward(
        self, stream: Stream[pb.PortForwardInput, pb.PortForwardOutput]
    ) -> None:
        from vmagent.portforward import serve_port_forward

        await serve_port_forward(stream)
