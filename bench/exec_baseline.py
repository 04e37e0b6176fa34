"""ExecSync `true` latency: criserver (micro-VM backend, TCG here) against containerd + runc on
this same machine, measured in one run, blocks alternating so host noise hits both alike.

    .venv/bin/python -m bench.exec_baseline [--execs 100] [--block 10] [--warmup 5] [--no-runc]
                                            [--booted] [--tb-size MIB]

Both runtimes are driven through their CRI socket by the same client (tests/cri_client.py, the
reference proto): PullImage, RunPodSandbox, CreateContainer (busybox `sleep 100000`),
StartContainer, then ExecSync `true`, timing each call as the client sees it. The image comes
from a local docker-registry (tests/registry.py's process and busybox image); containerd's
sandbox ("pause") image is the same busybox running `sleep`, pushed there too, since
registry.k8s.io is unreachable. An extra line times `runc exec <container> true` directly on
containerd's container (runc's own floor, no CRI, no shim). The host has 2 shared cores:
compare ratios, not absolute times.

Needs: apt packages containerd (1.6.20), runc, containernetworking-plugins, docker-registry,
plus the criserver guest assets (make guest).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.containerd_kit import RUNC_BIN, Containerd
from bench.pod_start import BenchDaemon, build_template, pct
from tests.cri_client import CRIClient, msg
from tests.image.oci import Pusher
from tests.registry import _start_registry, _stop, busybox_full_image

SLEEP_FOREVER = ["/bin/sleep", "2147483647"]


async def push_images(base: str) -> None:
    """busybox (e2e/busybox:latest, as the e2e fixtures push it) and a pause-like image
    (bench/pause:latest): the same layer, a config whose entrypoint sleeps forever."""
    busybox = busybox_full_image()
    pause = dataclasses.replace(busybox, config={**busybox.config, "Cmd": None,
                                                 "Entrypoint": SLEEP_FOREVER})
    async with aiohttp.ClientSession() as session:
        push = Pusher(session, base)
        await push.image("e2e/busybox", "latest", busybox)
        await push.image("bench/pause", "latest", pause)


@dataclasses.dataclass
class Target:
    name: str
    cri: CRIClient
    pod_id: str = ""
    cid: str = ""


async def setup(t: Target, image: str) -> None:
    t0 = time.monotonic()
    await t.cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)),
                                timeout=300)
    t.pod_id = await t.cri.run_pod(f"execb-{t.name}", hostname=f"execb-{t.name}")
    t.cid = await t.cri.create_container(t.pod_id, "sleeper", pod_name=f"execb-{t.name}",
                                         image=image, command=["sleep", "100000"])
    await t.cri.runtime.StartContainer(msg("StartContainerRequest", container_id=t.cid))
    print(f"  {t.name}: pull + pod + container up in {time.monotonic() - t0:.1f} s", flush=True)


async def teardown(t: Target) -> None:
    if not t.pod_id:
        return
    try:
        await t.cri.runtime.StopPodSandbox(
            msg("StopPodSandboxRequest", pod_sandbox_id=t.pod_id), timeout=60)
        await t.cri.runtime.RemovePodSandbox(
            msg("RemovePodSandboxRequest", pod_sandbox_id=t.pod_id), timeout=60)
    except Exception as exc:  # the kits kill whatever is left
        print(f"  warning: removing the {t.name} pod: {exc!r}", flush=True)


async def pod_netns(cri: CRIClient, pod_id: str) -> str | None:
    """containerd's pod netns path (/var/run/netns/cni-...), from the verbose status."""
    r = await cri.runtime.PodSandboxStatus(
        msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id, verbose=True))
    try:
        info = json.loads(r.info["info"])
        for ns in info["runtimeSpec"]["linux"]["namespaces"]:
            if ns["type"] == "network" and ns.get("path"):
                return str(ns["path"])
    except (KeyError, ValueError):
        pass
    return None


def exec_sync(t: Target) -> Callable[[], Awaitable[None]]:
    request = msg("ExecSyncRequest", container_id=t.cid, cmd=["true"], timeout=30)

    async def call() -> None:
        r = await t.cri.runtime.ExecSync(request, timeout=60)
        assert r.exit_code == 0, r

    return call


def runc_exec(root: Path, cid: str) -> Callable[[], Awaitable[None]]:
    argv = [RUNC_BIN, "--root", str(root), "exec", cid, "true"]

    async def call() -> None:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL)
        if await proc.wait() != 0:
            raise RuntimeError(f"{argv}: exit {proc.returncode}")

    return call


async def timed(call: Callable[[], Awaitable[None]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


async def run(execs: int, block: int, warmup: int, with_runc: bool,
              tb_size: int | None, booted: bool) -> None:
    reg_dir = Path(tempfile.mkdtemp(prefix="execb-reg-", dir="/tmp"))
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    crid: BenchDaemon | None = None
    try:
        await push_images(registry.base)
        image = f"{registry.host}/e2e/busybox:latest"
        pause = f"{registry.host}/bench/pause:latest"
        options: dict[str, int | bool] = {} if tb_size is None else {"tcg_tb_size_mib": tb_size}
        if booted:
            options["templates"] = False
        crid = BenchDaemon(network=True, options=options)
        with Containerd(registry.host, pause) as ctrd, crid:
            targets = [Target("containerd", ctrd.client()),
                       Target("criserver", crid.daemon.client())]
            try:
                if not booted:
                    # criserver's pod is a clone of a template, as pods are once one is built.
                    await build_template(targets[1].cri, crid.workdir)
                for t in targets:
                    await setup(t, image)
                ns = await pod_netns(targets[0].cri, targets[0].pod_id)
                if ns:
                    ctrd.netns_paths.add(ns)
                calls: dict[str, Callable[[], Awaitable[None]]] = {
                    t.name: exec_sync(t) for t in targets}
                if with_runc:
                    calls["runc exec (containerd's container)"] = runc_exec(ctrd.runc_root,
                                                                            targets[0].cid)
                for call in calls.values():
                    await timed(call, warmup)
                samples: dict[str, list[float]] = {name: [] for name in calls}
                load0 = os.getloadavg()[0]
                done = 0
                order = list(calls)
                while done < execs:
                    k = min(block, execs - done)
                    for name in order:
                        samples[name] += await timed(calls[name], k)
                    done += k
                    order.reverse()  # A B C, C B A, ...: no runtime always follows another
                    print(f"  {done}/{execs}: " + ", ".join(
                        f"{name.split()[0]} p50 {pct(v, 0.5) * 1000:.1f} ms"
                        for name, v in samples.items()), flush=True)
                load1 = os.getloadavg()[0]
            finally:
                for t in targets:
                    await teardown(t)
                    await t.cri.close()
    finally:
        _stop(registry)
        shutil.rmtree(reg_dir, ignore_errors=True)
        # CNI host-local's dir for criserver's private network (BenchDaemon leaves it).
        if crid is not None:
            shutil.rmtree(Path("/var/lib/cni/networks") / f"crb-{crid.tag}", ignore_errors=True)
    version = subprocess.run(["containerd", "--version"], capture_output=True,
                             text=True).stdout.split()[-1]
    base50, base99 = pct(samples["containerd"], 0.5), pct(samples["containerd"], 0.99)
    print()
    print(f"ExecSync `true`, {execs} calls per runtime after {warmup} warm-up, blocks of {block} "
          f"alternating (order reversed each round); client-observed (tests/cri_client.py "
          f"over the CRI socket). "
          f"containerd {version} + runc (overlayfs, CNI bridge); criserver microvm backend (TCG). "
          f"Load average {load0:.1f} -> {load1:.1f}.")
    print()
    print("| runtime | p50 | p99 | p50 / containerd | p99 / containerd |")
    print("|---|---|---|---|---|")
    for name, v in samples.items():
        p50, p99 = pct(v, 0.5), pct(v, 0.99)
        print(f"| {name} | {p50 * 1000:.1f} ms | {p99 * 1000:.1f} ms | {p50 / base50:.2f}x "
              f"| {p99 / base99:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--execs", type=int, default=100, help="ExecSync calls per runtime")
    ap.add_argument("--block", type=int, default=10, help="calls per block before switching")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per runtime first")
    ap.add_argument("--no-runc", action="store_true", help="skip the direct `runc exec` line")
    ap.add_argument("--tb-size", type=int, default=None,
                    help="criserver's tcg_tb_size_mib (default: the backend's)")
    ap.add_argument("--booted", action="store_true",
                    help="criserver's pod boots (templates = false) instead of being a clone")
    args = ap.parse_args()
    asyncio.run(run(args.execs, args.block, args.warmup, not args.no_runc, args.tb_size,
                    args.booted))


if __name__ == "__main__":
    main()
