"""Churn and load on the real micro-VM daemon, the long run of tests/e2e/test_churn_vm.py
(issue 18, step 5; figures in docs/reliability.md).

    .venv/bin/python bench/churn.py [--cycles 500] [--clients 20] [--parallel 2] [--wedged]

Each cycle makes a pod (a clone of the template, CNI network) with a busybox container, starts
it, and removes the pod; `--parallel` cycles at a time. Meanwhile `--clients` clients call
ListPodSandbox, ListContainers, PodSandboxStatus, ContainerStatus and ListContainerStats in a
loop. `--wedged`: one more pod's QEMU is stopped for the whole run. Prints the read calls'
latencies (p50, p99, max) and the daemon's footprint before and after (Status verbose).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.churn import churn, percentile  # noqa: E402
from tests.e2e.conftest import running_vm_daemon  # noqa: E402
from tests.image.oci import Pusher  # noqa: E402
from tests.registry import _start_registry, _stop, busybox_full_image  # noqa: E402

MiB = 1 << 20


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--wedged", action="store_true")
    args = parser.parse_args()
    with running_vm_daemon() as daemon:
        registry = _start_registry(daemon.workdir / "registry", htpasswd=False)
        try:
            async with aiohttp.ClientSession() as session:
                await Pusher(session, registry.base).image("bench/busybox", "latest",
                                                           busybox_full_image())
            image = f"{registry.host}/bench/busybox:latest"
            result = await churn(daemon, image, args.cycles, args.clients, args.parallel,
                                 args.wedged)
        finally:
            _stop(registry)
    print(f"\n{result.cycles} cycles ({args.parallel} at a time) in {result.seconds:.0f} s, "
          f"{args.clients} readers{', one guest wedged' if args.wedged else ''}"
          f"{f' (exec into it: {result.wedged_exec})' if args.wedged else ''}\n")
    print("| read call | calls | p50 | p99 | max |")
    print("|---|---|---|---|---|")
    for name, values in sorted(result.latencies.items()):
        print(f"| {name} | {len(values)} | {percentile(values, 50) * 1000:.1f} ms | "
              f"{percentile(values, 99) * 1000:.1f} ms | {max(values) * 1000:.1f} ms |")
    print("\n| daemon | before | after |")
    print("|---|---|---|")
    for key in ("rssBytes", "openFds", "threads", "asyncioTasks"):
        scale = MiB if key == "rssBytes" else 1
        unit = " MiB" if key == "rssBytes" else ""
        print(f"| {key} | {result.before[key] / scale:.0f}{unit} | "
              f"{result.after[key] / scale:.0f}{unit} |")
    print(f"\nnew open files after the run: {result.new_files() or 'none'}")


if __name__ == "__main__":
    asyncio.run(main())
