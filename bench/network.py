"""Pod network create/remove cycles: time per setup and teardown, and what is left afterwards
(veths, netns, IP allocations, iptables rules, open fds).

    sudo .venv/bin/python -m bench.network --cycles 200 [--parallel 4] [--hostport]

Uses its own bridge, subnet and temp dirs; removes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from criserver.config import NetworkConfig
from criserver.network import netns
from criserver.network.cni import CniManager, DefaultNetwork, PortMapping
from criserver.network.pod import PodNetwork


async def _sh(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode()


async def _nat_rules() -> set[str]:
    return set((await _sh("iptables", "-w", "-t", "nat", "-S")).splitlines())


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[int(len(values) * 0.95) - 1] if len(values) >= 20 else values[-1]
    return f"median {statistics.median(values) * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms"


async def run(cycles: int, parallel: int, hostport: bool) -> int:
    tag = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix="bench-net-"))
    ipam = root / "ipam"
    config = NetworkConfig(
        cni_bin_dirs=["/usr/lib/cni"],
        cni_conf_dir=str(root / "conf"),
        default_subnet="10.254.0.0/22",
    )
    cni = CniManager(
        config,
        root / "cache",
        default_network=DefaultNetwork(f"bench-{tag}", f"bn{tag}", str(ipam)),
    )
    net = PodNetwork(cni, root / "state")
    links_before = set(os.listdir("/sys/class/net"))
    rules_before = await _nat_rules()
    fds_before = len(os.listdir("/proc/self/fd"))
    setup_t: list[float] = []
    teardown_t: list[float] = []

    async def one(pod_id: str, port: int) -> None:
        mappings = [PortMapping(port, 80)] if hostport else []
        t0 = time.perf_counter()
        await net.setup(pod_id, pod_id, "bench", pod_id, mappings)
        t1 = time.perf_counter()
        await net.teardown(pod_id)
        setup_t.append(t1 - t0)
        teardown_t.append(time.perf_counter() - t1)

    start = time.perf_counter()
    try:
        for base in range(0, cycles, parallel):
            batch = range(base, min(base + parallel, cycles))
            await asyncio.gather(*(one(f"b{i}", 20000 + i % 1000) for i in batch))
        wall = time.perf_counter() - start
        await asyncio.sleep(1)  # the kernel frees a netns (and its veth) asynchronously
        leaked_links = set(os.listdir("/sys/class/net")) - links_before - {f"bn{tag}"}
        leaked_rules = {
            r for r in await _nat_rules() - rules_before if "CNI-HOSTPORT" not in r.split()[1]
        }
        leaked_ns = os.listdir(net.netns_dir) if net.netns_dir.exists() else []
        leaked_ips = [f for _, _, fs in os.walk(ipam) for f in fs if f[0].isdigit()]
        leaked_cache = os.listdir(root / "cache" / "results")
        leaked_fds = len(os.listdir("/proc/self/fd")) - fds_before
        print(
            f"cycles={cycles} parallel={parallel} hostport={hostport} wall={wall:.1f}s "
            f"({cycles / wall:.1f} cycles/s)"
        )
        print(f"setup: {_ms(setup_t)}; teardown: {_ms(teardown_t)}")
        print(
            f"leaks: links={len(leaked_links)} netns={len(leaked_ns)} ips={len(leaked_ips)} "
            f"iptables={len(leaked_rules)} cache={len(leaked_cache)} fds={leaked_fds}"
        )
        return int(bool(leaked_links or leaked_ns or leaked_ips or leaked_rules or leaked_cache))
    finally:
        await netns.release_dir(net.netns_dir)
        await _sh("ip", "link", "del", f"bn{tag}")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--hostport", action="store_true", help="one hostPort per pod")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(run(args.cycles, args.parallel, args.hostport)))


if __name__ == "__main__":
    main()
