"""Agent channel benchmark: Health.Check round trips (p50/p99) through AgentClient over the
simulated virtio-serial port (pty behind a QEMU-like socket) and over a Unix socket, the time
from spawning the agent to its first answered check, and the agent's start-up import time.

    .venv/bin/python bench/agent_rtt.py [--calls 2000] [--starts 5]
    .venv/bin/python bench/agent_rtt.py --vm [--assets DIR] [--starts 3] [--calls 500]

Without --vm it runs on the host and measures the agent's own costs (Python, grpclib, the port
transport), not virtio or TCG. With --vm it boots real micro-VMs (TCG) from the guest assets:
QEMU start -> first answered check, RTT over real virtio-serial, and the import time of the
agent's modules inside the guest.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from criserver.backends.microvm.channel import AgentAddress, AgentClient  # noqa: E402
from tests.vmagent.agentproc import start_agent  # noqa: E402
from tests.vmagent.portsim import PortSim  # noqa: E402

AGENT_IMPORTS = (
    "import sys; sys.modules['ssl'] = None; "
    "import vmagent.main, vmagent.server, vmagent.service, vmagent.pid1"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def rtt(transport: str, calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        agent = await start_agent(Path(tmp), transport=transport)
        client = AgentClient("bench", AgentAddress(unix_path=agent.sock_path))
        try:
            await client.wait_ready(time.monotonic() + 30)
            for _ in range(50):  # warm-up
                await client.check()
            samples = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await client.check()
                samples.append((time.perf_counter() - t0) * 1000)
        finally:
            client.close()
            await agent.stop()
    return {"p50_ms": pct(samples, 0.5), "p99_ms": pct(samples, 0.99),
            "mean_ms": statistics.fmean(samples)}


async def first_answer(starts: int) -> list[float]:
    """Seconds from spawning the agent to the first answered Check, the client already waiting
    on the port (as the daemon does right after starting QEMU)."""
    out = []
    for _ in range(starts):
        with tempfile.TemporaryDirectory() as tmp:
            port = PortSim(str(Path(tmp) / "agent.sock"))
            await port.start()
            client = AgentClient("bench", AgentAddress(unix_path=port.sock_path))
            waiter = asyncio.create_task(client.wait_ready(time.monotonic() + 60))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            agent = await start_agent(Path(tmp), port=port)
            try:
                await waiter
                out.append(time.monotonic() - t0)
            finally:
                client.close()
                await agent.stop()
    return out


def _importtime(code: str) -> list[tuple[int, int, str]]:
    """(depth, cumulative us, module) rows of `python -X importtime -c code`."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                         capture_output=True, text=True, cwd=REPO, check=True).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cum, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((depth, int(cum), name.strip()))
    return rows


def import_time(runs: int) -> tuple[float, list[tuple[float, str]]]:
    """Median import time (ms) of the agent's start-up modules beyond the interpreter's own
    start-up imports, and the agent's direct imports by cost (from the last run)."""
    startup = {name for _, _, name in _importtime("pass")}
    totals = []
    top: list[tuple[float, str]] = []
    for _ in range(runs):
        rows = _importtime(AGENT_IMPORTS)
        mine = [(cum, name) for depth, cum, name in rows if depth == 0 and name not in startup]
        totals.append(sum(cum for cum, _ in mine) / 1000)
        top = sorted(((cum / 1000, name) for depth, cum, name in rows
                      if depth <= 1 and name not in startup), reverse=True)[:10]
    return statistics.median(totals), top


async def in_vm(assets_dir: Path, starts: int, calls: int) -> None:
    from criserver.backends.microvm.guest import GuestBoot, pod_guest_spec
    from criserver.vm import assets as assets_mod
    from criserver.vm.accel import read_tsc_khz
    from criserver.vm.qemu import SerialTransport
    from criserver.vm.vm import VM
    from vmagent.api import agent_pb2 as pb

    assets = assets_mod.load(assets_dir)
    firsts, serving = [], []
    for i in range(starts):
        with tempfile.TemporaryDirectory(prefix="rtt") as tmp:
            state = Path(tmp)
            spec = pod_guest_spec(f"bench-{i}", state, assets,
                                  SerialTransport(state / "agent.sock"),
                                  GuestBoot(tsc_khz=read_tsc_khz()), pvpanic=False)
            vm = VM(spec)
            t0 = time.monotonic()
            await vm.start()
            client = AgentClient(spec.vm_id, AgentAddress(unix_path=str(state / "agent.sock")),
                                 call_timeout=60)
            try:
                ready = await client.wait_ready(time.monotonic() + 120)
                firsts.append(time.monotonic() - t0)
                serving.append(ready.agent_serving_uptime_seconds)
                print(f"  boot {i}: qemu start -> first answer {firsts[-1]:.2f} s; guest uptime:"
                      f" agent main {ready.agent_started_uptime_seconds:.2f} s, serving"
                      f" {ready.agent_serving_uptime_seconds:.2f} s")
                if i == starts - 1:
                    for _ in range(20):
                        await client.check()
                    samples = []
                    for _ in range(calls):
                        t1 = time.perf_counter()
                        await client.check()
                        samples.append((time.perf_counter() - t1) * 1000)
                    print(f"Health.Check RTT in VM (virtio-serial, TCG): p50 "
                          f"{pct(samples, 0.5):.2f} ms  p99 {pct(samples, 0.99):.2f} ms  "
                          f"mean {statistics.fmean(samples):.2f} ms  ({calls} calls)")
                    out = await client.exec_sync(pb.ExecSyncRequest(process=pb.Process(argv=[
                        "python3", "-X", "importtime", "-c", AGENT_IMPORTS]),
                        timeout_seconds=60))
                    rows = []
                    for line in out.stderr.decode().splitlines():
                        if line.startswith("import time:") and "self [us]" not in line:
                            _, cum, name = line[len("import time:"):].split("|")
                            if len(name) - len(name.lstrip()) <= 3:
                                rows.append((int(cum) / 1000, name.strip()))
                    print("agent imports in the guest (a second Python process, warm page "
                          "cache), largest:")
                    for ms, name in sorted(rows, reverse=True)[:10]:
                        print(f"  {ms:7.1f} ms  {name}")
                await client.shutdown()
            finally:
                client.close()
                if not await vm.wait_exited(30):
                    await vm.kill()
    print(f"qemu start -> first answered Check: median {statistics.median(firsts):.2f} s "
          f"(min {min(firsts):.2f}, max {max(firsts):.2f}); agent serving at guest uptime "
          f"median {statistics.median(serving):.2f} s")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--vm", action="store_true", help="boot real micro-VMs")
    ap.add_argument("--assets", type=Path, default=Path("/usr/local/share/criserver/guest"))
    args = ap.parse_args()
    if args.vm:
        await in_vm(args.assets, args.starts, args.calls)
        return
    for transport in ("port", "unix"):
        r = await rtt(transport, args.calls)
        print(f"Health.Check RTT over {transport:4s}: p50 {r['p50_ms']:.3f} ms  "
              f"p99 {r['p99_ms']:.3f} ms  mean {r['mean_ms']:.3f} ms  ({args.calls} calls)")
    starts = await first_answer(args.starts)
    print(f"agent spawn -> first answered Check (host): median {statistics.median(starts):.3f} s"
          f"  min {min(starts):.3f}  max {max(starts):.3f}  ({len(starts)} starts)")
    total, top = import_time(5)
    print(f"agent start-up imports (host, -X importtime): median {total:.1f} ms; largest:")
    for ms, name in top:
        print(f"  {ms:7.1f} ms  {name}")


if __name__ == "__main__":
    asyncio.run(main())
