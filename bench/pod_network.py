"""TCP throughput host -> pod, through the pod network into a real micro-VM.

Starts a registry and the daemon (micro-VM backend on a private CNI network), runs a pod whose
container is a TCP sink (busybox `nc -l`), and sends BYTES from the host to the pod IP.
Baseline, in the same run: the same sender to the same sink program on the host's loopback.

    .venv/bin/python bench/pod_network.py [--mib 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cri_client import msg
from tests.daemon import Daemon, unmount_under
from tests.e2e.conftest import kill_vms_under, microvm_config, remove_all_pods, short_workdir
from tests.image.oci import Pusher
from tests.registry import _start_registry, _stop, busybox_full_image

PORT = 5001
CHUNK = b"\0" * (256 * 1024)


def send(host: str, port: int, total: int) -> float:
    """Seconds to push `total` bytes and have the receiver close (it got everything)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    started = time.monotonic()
    with sock:
        sent = 0
        while sent < total:
            sock.sendall(CHUNK)
            sent += len(CHUNK)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(120)
        while sock.recv(65536):
            pass
    return time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    total = args.mib * 1024 * 1024
    workdir = short_workdir()
    registry = _start_registry(workdir / "registry", htpasswd=False)
    (workdir / "d").mkdir()
    daemon = Daemon(workdir / "d", config=microvm_config(workdir / "d"))
    try:
        async with aiohttp.ClientSession() as session:
            await Pusher(session, registry.base).image("bench/busybox", "latest",
                                                       busybox_full_image())
        image = f"{registry.host}/bench/busybox:latest"
        daemon.start()
        cri = daemon.client()
        await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)))
        pod = await cri.run_pod("net-bench")
        ip = (await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest",
                                                     pod_sandbox_id=pod))).status.network.ip
        pod_times, host_times = [], []
        for _ in range(args.runs):
            cid = await cri.create_container(pod, f"sink-{len(pod_times)}", pod_name="net-bench",
                                             image=image, command=["nc", "-l", "-p", str(PORT)])
            await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
            pod_times.append(await asyncio.to_thread(send, ip, PORT, total))
            await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
            sink = subprocess.Popen(["busybox", "nc", "-l", "-p", str(PORT + 1)],
                                    stdout=subprocess.DEVNULL)
            host_times.append(await asyncio.to_thread(send, "127.0.0.1", PORT + 1, total))
            sink.wait(30)
        await cri.close()
    finally:
        remove_all_pods(daemon)
        daemon.kill()
        kill_vms_under(workdir)
        unmount_under(workdir)
        _stop(registry)
        shutil.rmtree(workdir, ignore_errors=True)
    pod_rate = args.mib / statistics.median(pod_times)
    host_rate = args.mib / statistics.median(host_times)
    print(f"{args.mib} MiB per run, {args.runs} runs, medians\n")
    print("| path | MiB/s | ratio to baseline |\n|---|---|---|")
    print(f"| host loopback -> busybox nc on the host (baseline) | {host_rate:.0f} | 1.00 |")
    print(f"| host -> pod IP -> tap -> virtio-net -> busybox nc in a container (TCG) "
          f"| {pod_rate:.1f} | {pod_rate / host_rate:.3f} |")


if __name__ == "__main__":
    asyncio.run(main())
