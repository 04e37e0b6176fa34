"""CRI call latency and daemon memory with a large store.

Starts the real daemon (inert test backend, so only the daemon itself is measured), fills it
with PODS pods and CONTAINERS containers through the CRI, and measures p50/p99 of Version,
ListPodSandbox and ListContainers over a Unix socket, plus the daemon's RSS idle and full.
Baseline, measured in the same run: the same client calling an empty grpcio aio server on a
Unix socket (the floor of one Python gRPC round trip here).

    .venv/bin/python bench/cri_latency.py [--pods 1000] [--containers 3000] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cri_client import msg
from tests.daemon import Daemon


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


async def timed(call, request, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(20):  # warm-up
        await call(request)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call(request)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def baseline(tmp: Path, n: int) -> list[float]:
    """An empty unary call on a bare grpcio aio server: the floor for any CRI call."""
    path = tmp / "echo.sock"
    server = grpc.aio.server()

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        call = channel.unary_unary("/bench.Echo/Echo")
        samples = await timed(call, b"", n)
    await server.stop(None)
    return samples


async def fill(cri, pods: int, containers: int) -> None:  # type: ignore[no-untyped-def]
    per_pod = max(1, containers // pods)
    made = 0
    sem = asyncio.Semaphore(16)

    async def one_pod(i: int) -> None:
        nonlocal made
        async with sem:
            pod = await cri.run_pod(f"pod-{i}", labels={"app": f"a{i % 10}"})
            for j in range(per_pod):
                if made >= containers:
                    break
                made += 1
                cid = await cri.create_container(pod, f"c{j}", pod_name=f"pod-{i}",
                                                 labels={"c": str(j)})
                if j == 0:
                    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))

    await asyncio.gather(*(one_pod(i) for i in range(pods)))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--containers", type=int, default=3000)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        base = await baseline(tmp, args.calls)
        (tmp / "d").mkdir()
        daemon = Daemon(tmp / "d").start()
        cri = daemon.client()
        await cri.runtime.Version(msg("VersionRequest"))
        time.sleep(1)
        idle_rss = rss_mib(daemon.pid)
        started = time.perf_counter()
        await fill(cri, args.pods, args.containers)
        fill_s = time.perf_counter() - started
        pods = len((await cri.runtime.ListPodSandbox()).items)
        containers = len((await cri.runtime.ListContainers()).containers)
        results = {
            "empty gRPC call (baseline)": base,
            "Version": await timed(cri.runtime.Version, msg("VersionRequest"), args.calls),
            f"ListPodSandbox ({pods} pods)": await timed(
                cri.runtime.ListPodSandbox, msg("ListPodSandboxRequest"), args.calls),
            f"ListContainers ({containers} containers)": await timed(
                cri.runtime.ListContainers, msg("ListContainersRequest"), args.calls),
            "ListContainers, filtered by pod": await timed(
                cri.runtime.ListContainers, msg("ListContainersRequest", filter=msg(
                    "ContainerFilter", pod_sandbox_id=(await cri.runtime.ListPodSandbox())
                    .items[0].id)), args.calls),
        }
        # The daemon's side alone: the same call with the response left undecoded, as the
        # Python client's decoding of ~0.8 MB costs more than the daemon's work.
        raw_list = cri.channel.unary_unary("/runtime.v1.RuntimeService/ListContainers",
                                           request_serializer=lambda m: m.SerializeToString())
        results[f"ListContainers ({containers}), response not decoded"] = await timed(
            raw_list, msg("ListContainersRequest"), args.calls)
        full_rss = rss_mib(daemon.pid)
        await cri.close()
        daemon.stop()

    base_p50 = percentiles(base)[0]
    print(f"pods={pods} containers={containers} calls={args.calls} "
          f"fill={fill_s:.1f}s ({(pods + containers) / fill_s:.0f} creates/s)\n")
    print("| call | p50 ms | p99 ms | p50 / baseline |")
    print("|---|---|---|---|")
    for name, samples in results.items():
        p50, p99 = percentiles(samples)
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base_p50:.2f} |")
    print(f"\ndaemon RSS: idle {idle_rss:.1f} MiB, with the store filled {full_rss:.1f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
