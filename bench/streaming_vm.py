"""exec/port-forward into a real micro-VM: what the streaming path costs end to end, against
the agent channel alone.

    .venv/bin/python bench/streaming_vm.py [--rounds 300] [--mib 16]

Boots one guest (TCG here) with a busybox container, then measures:
1. Interactive exec round trip, one byte into `cat` in the container and its echo back
   (p50/p99): through SPDY/3.1 (the daemon's streaming server and the same relay
   MicroVMBackend.exec uses, criserver/backends/microvm/streams.py) vs an Exec stream opened
   directly with AgentClient (the agent channel alone: virtio-serial + HTTP/2 + the guest
   agent).
2. Port-forward throughput, a --mib MiB file from busybox httpd in the container: through a
   SPDY port-forward stream vs a PortForward stream opened directly with AgentClient.
The streaming server runs in this process (no CRI round trip: only the data path is timed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.streaming import measure, rtt_spdy  # noqa: E402
from criserver.backends.microvm import streams  # noqa: E402
from criserver.backends.microvm.channel import AgentAddress, AgentClient  # noqa: E402
from criserver.runtime.streaming.interface import (  # noqa: E402
    ByteSink,
    ByteSource,
    ResizeSource,
)
from criserver.runtime.streaming.portforward import PortForwardRequest  # noqa: E402
from criserver.runtime.streaming.remotecommand import StdioRequest  # noqa: E402
from criserver.runtime.streaming.server import StreamingServer  # noqa: E402
from criserver.store.records import ContainerRecord, PodRecord  # noqa: E402
from criserver.vm import assets as assets_mod  # noqa: E402
from criserver.vm.vm import VM  # noqa: E402
from tests.runtime.streaming.conftest import CONTAINER, POD  # noqa: E402
from tests.runtime.streaming.spdy_client import SpdyClient  # noqa: E402
from tests.vmagent.containerkit import busybox_rootfs, container_vm_spec, make_erofs, oci_spec  # noqa: E402
from vmagent.api import agent_pb2 as pb  # noqa: E402
from vmagent.credit import WINDOW  # noqa: E402

HTTP_PORT = 8080


class VMStreams:
    """MicroVMBackend's exec, attach and port_forward, bound to this bench's VM and
    container."""

    def __init__(self, agent: AgentClient, container_id: str) -> None:
        self.agent = agent
        self.container_id = container_id

    async def exec(self, pod: PodRecord, container: ContainerRecord, cmd: list[str], *,
                   tty: bool, stdin: ByteSource | None, stdout: ByteSink | None,
                   stderr: ByteSink | None, resize: ResizeSource | None) -> int:
        return await streams.exec_in_vm(self.agent, self.container_id, cmd, tty=tty,
                                        stdin=stdin, stdout=stdout, stderr=stderr,
                                        resize=resize)

    async def attach(self, pod: PodRecord, container: ContainerRecord, *, tty: bool,
                     stdin: ByteSource | None, stdout: ByteSink | None,
                     stderr: ByteSink | None, resize: ResizeSource | None) -> None:
        raise NotImplementedError

    async def port_forward(self, pod: PodRecord, port: int, *, inbound: ByteSource,
                           outbound: ByteSink) -> None:
        await streams.port_forward_in_vm(self.agent, pod.id, port, inbound=inbound,
                                         outbound=outbound)


WARMUP = 20  # round trips before measuring: TCG translates the hot paths first

async def rtt_agent(agent: AgentClient, cid: str, rounds: int) -> tuple[float, float]:
    """cat through an Exec stream on the agent channel, acking output as the relay does."""
    async with agent.duplex("Exec") as s:
        await s.send(pb.StdioInput(start=pb.ExecStart(
            container_id=cid, exec_id="bench", process=pb.Process(argv=["cat"]), stdin=True)))
        assert (await s.recv()).WhichOneof("kind") == "started_pid"

        async def roundtrip() -> None:
            await s.send(pb.StdioInput(stdin=b"x"))
            while True:
                msg = await s.recv()
                if msg.WhichOneof("kind") == "stdout":
                    await s.send(pb.StdioInput(output_ack=len(msg.stdout)))
                    return

        result = await measure(roundtrip, rounds, WARMUP)
        await s.send(pb.StdioInput(close_stdin=True))
        while await s.recv() is not None:
            pass
    return result


REQUEST = b"GET /blob HTTP/1.0\r\n\r\n"


async def fetch_agent(agent: AgentClient) -> int:
    count = 0
    async with agent.duplex("PortForward") as s:
        await s.send(pb.PortForwardInput(start=pb.PortForwardStart(port=HTTP_PORT)))
        assert (await s.recv()).connected
        await s.send(pb.PortForwardInput(data=REQUEST))
        await s.send(pb.PortForwardInput(close_write=True))
        unacked = 0
        while (msg := await s.recv()) is not None:
            if msg.WhichOneof("kind") == "data":
                count += len(msg.data)
                unacked += len(msg.data)
                if unacked >= WINDOW // 2:  # ack as a consumer that keeps up would
                    await s.send(pb.PortForwardInput(ack=unacked))
                    unacked = 0
    return count


async def fetch_spdy(url: str) -> int:
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    headers = {"port": str(HTTP_PORT), "requestID": "0"}
    error = await client.open_stream({**headers, "streamType": "error"})
    await error.close()
    data = await client.open_stream({**headers, "streamType": "data"})
    await data.write(REQUEST, fin=True)
    count = 0
    while chunk := await data.read():
        count += len(chunk)
    await client.close()
    return count


async def main(assets_dir: Path, rounds: int, mib: int) -> None:
    assets = assets_mod.load(assets_dir)
    work = Path(tempfile.mkdtemp(prefix="strbench-"))
    (work / "images").mkdir()
    image = make_erofs(busybox_rootfs(work / "rootfs"), work / "images")
    spec = container_vm_spec(f"strbench-{os.getpid()}", work, assets)
    machine = VM(spec)
    await machine.start()
    agent = AgentClient(spec.vm_id, AgentAddress(unix_path=str(work / "agent.sock")),
                        call_timeout=120)
    server = StreamingServer("127.0.0.1", 0)
    await server.start()
    try:
        await agent.wait_ready(time.monotonic() + 180)
        await agent.setup_sandbox(pb.SetupSandboxRequest(request_id="s", sandbox_id="p"))
        # No pod network here: bring up the loopback httpd listens on (CNI setup would).
        up = await agent.exec_sync(pb.ExecSyncRequest(process=pb.Process(
            argv=["ip", "link", "set", "lo", "up"]), timeout_seconds=30))
        assert up.exit_code == 0, up
        for cid, argv in (("shell", ["sleep", "100000"]),
                          ("web", ["sh", "-c", f"mkdir -p /www && head -c {mib << 20} "
                                   f"/dev/zero > /www/blob && exec httpd -f -p {HTTP_PORT} "
                                   "-h /www"])):
            await agent.call("CreateContainer", pb.CreateContainerRequest(
                container_id=cid, sandbox_id="p", oci_spec_json=oci_spec(argv),
                rootfs=pb.Rootfs(lowers=[pb.Mount(type="erofs", source=f"image:{image}")])),
                timeout=120)
            await agent.call("StartContainer", pb.StartContainerRequest(container_id=cid))
        backend = VMStreams(agent, "shell")
        exec_url = server.prepare(StdioRequest("exec", backend, POD, CONTAINER, ("cat",),
                                               stdin=True, stdout=True))
        print(f"interactive exec round trip, 1 byte through `cat` in the container "
              f"({rounds} rounds):")
        for label, run in (("agent channel alone", rtt_agent(agent, "shell", rounds)),
                           ("SPDY/3.1 into the VM", rtt_spdy(exec_url, rounds, WARMUP))):
            p50, p99 = await run
            print(f"  {label:24s} p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        await asyncio.sleep(1)  # httpd is up by now (the blob is written before it starts)
        print(f"port-forward throughput, {mib} MiB from busybox httpd in the container:")
        for label, fetch in (
                ("agent channel alone", lambda: fetch_agent(agent)),
                ("SPDY/3.1 into the VM", lambda: fetch_spdy(server.prepare(
                    PortForwardRequest(backend, POD, (HTTP_PORT,)))))):
            results = []
            for _ in range(3):
                start = time.perf_counter()
                received = await fetch()
                elapsed = time.perf_counter() - start
                assert received > mib << 20, (label, received)
                results.append(received / elapsed / 2**20)
            print(f"  {label:24s} {sorted(results)[1]:6.1f} MiB/s (median of 3)")
        await agent.shutdown()
    finally:
        await server.stop()
        agent.close()
        if not machine.exited:
            await machine.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=Path(
        os.environ.get("CRISERVER_GUEST_ASSETS", assets_mod.DEFAULT_ASSETS_DIR)))
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--mib", type=int, default=16)
    a = ap.parse_args()
    asyncio.run(main(a.assets, a.rounds, a.mib))
