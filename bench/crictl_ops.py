"""The issue 16 yardstick: each lifecycle operation as a new user runs it, one crictl process per
call, against criserver (micro-VM backend with its defaults: pods cloned from a template,
network on) and containerd + runc, in the same run, alternating round by round.

    flock /tmp/criserver-vm.lock .venv/bin/python -m bench.crictl_ops [--rounds 10]

A round is runp, create (`sleep 3600`, busybox from a local registry, pulled beforehand),
start, exec -s `true` (the first exec in a new container), stop -t 2, rm, stopp, rmp. Each is
the wall time of its crictl process (crictl's own start-up, ~20 ms, is in both sides alike).
Both sides run the same CNI plugins (criserver's built-in network's chain: bridge with
masquerade and hairpin, host-local, portmap; each adds loopback), as on a node where both read
one CNI config. One untimed round per side first (criserver's builds its template). Prints
the medians, the ratio criserver/containerd and the issue's target for each.

Then the same container ops in a warm pod (`--warm-rounds`, default as many): each round's pod
first runs one container through create, start, exec, stop and rm untimed, and the same ops
are timed on its second container. Under TCG a fresh clone translates every code path its
first container takes (the template's saved state has no translation cache); the second
container shows what the design costs once that is paid (a pod's next containers, restarts,
init containers before the app).

`--warm-pool N` runs criserver with a pool of N warmed VMs (the microvm option `warm_pool`,
by default the daemon's: 1): every round then waits untimed until the pool is full again
(crictl info), so it measures a node whose pods arrive no faster than the pool refills.
`--warm-pool 0`: every pod a fresh clone. Needs root, containerd (1.6.20),
runc, containernetworking-plugins, docker-registry, and crictl (`make tools`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.containerd_kit import Containerd
from bench.exec_baseline import push_images
from bench.pod_start import DEFAULTS, BenchDaemon, build_template
from tests.conformance.tools import cri_tools_version
from tests.registry import _start_registry, _stop

REPO = Path(__file__).resolve().parents[1]

OPS = ("runp", "create", "start", "exec -s", "stop -t 2", "rm", "stopp", "rmp")
CONTAINER_OPS = ("create", "start", "exec -s", "stop -t 2", "rm")
# (label, ops summed, target ratio)
TARGETS = (
    ("runp", ("runp",), 3.0),
    ("create + start", ("create", "start"), 3.0),
    ("exec -s (new container)", ("exec -s",), 1.5),
    ("stop -t 2", ("stop -t 2",), 2.0),
    ("rm", ("rm",), 2.0),
    ("stopp", ("stopp",), 2.0),
    ("rmp", ("rmp",), 2.0),
)


def crictl_binary() -> Path:
    path = REPO / ".tools" / f"cri-tools-{cri_tools_version()}" / "crictl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make tools`")
    return path


class Side:
    """One runtime, driven only through crictl."""

    def __init__(self, name: str, socket: Path, work: Path, pool: int = 0) -> None:
        self.name = name
        self.pool = pool  # warmed VMs to wait for before each round
        self.endpoint = f"unix://{socket}"
        self.work = work
        self.samples: dict[str, list[float]] = {op: [] for op in OPS}

    def crictl(self, *args: str) -> tuple[str, float]:
        argv = [str(crictl_binary()), "--runtime-endpoint", self.endpoint, "--image-endpoint",
                self.endpoint, "--timeout", "120s", *args]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: crictl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip(), seconds

    def round(self, i: int, image: str, timed: bool, warm: bool = False) -> None:
        """One pod's lifecycle; every op's crictl time into `samples` when `timed`. `warm`:
        a first container runs its lifecycle untimed, the second one's ops are timed."""
        d = self.work / f"r{i}"
        (d / "logs").mkdir(parents=True)
        pod = {"metadata": {"name": f"cb-{i}", "namespace": "bench", "uid": uuid.uuid4().hex,
                            "attempt": 0},
               "hostname": f"cb-{i}", "log_directory": str(d / "logs"), "linux": {}}
        ctr = {"metadata": {"name": "c"}, "image": {"image": image},
               "command": ["sleep", "3600"], "log_path": "c.log", "linux": {}}
        (d / "pod.json").write_text(json.dumps(pod))
        (d / "ctr.json").write_text(json.dumps(ctr))

        (d / "first.json").write_text(json.dumps({**ctr, "metadata": {"name": "first"}}))
        if timed:
            self.wait_pool()

        def op(name: str, *args: str, timing: bool = True) -> str:
            out, seconds = self.crictl(*args)
            if timed and timing:
                self.samples[name].append(seconds)
            return out

        def container(pod_id: str, config: str, timing: bool) -> None:
            cid = op("create", "create", "--no-pull", pod_id, str(d / config),
                     str(d / "pod.json"), timing=timing)
            op("start", "start", cid, timing=timing)
            op("exec -s", "exec", "-s", cid, "true", timing=timing)
            op("stop -t 2", "stop", "-t", "2", cid, timing=timing)
            op("rm", "rm", cid, timing=timing)

        pod_id = op("runp", "runp", str(d / "pod.json"))
        if warm:
            container(pod_id, "first.json", timing=False)
        container(pod_id, "ctr.json", timing=True)
        op("stopp", "stopp", pod_id)
        op("rmp", "rmp", pod_id)

    def wait_pool(self, max_wait: float = 180.0) -> None:
        deadline = time.monotonic() + max_wait
        while self.pool and self.pooled() < self.pool:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the warm pool did not refill in {max_wait} s")
            time.sleep(0.2)

    def pooled(self) -> int:
        info = json.loads(self.crictl("info")[0])
        return sum(v.get("warmPool", {}).get("ready", 0) for k, v in info.items()
                   if k.startswith("runtime.") and isinstance(v, dict))

    def median_ms(self, ops: tuple[str, ...]) -> float:
        return sum(statistics.median(self.samples[o]) for o in ops) * 1000


def report(cri: Side, ctrd: Side, rounds: int, warm: bool = False) -> str:
    title = "a pod's second container (its first ran untimed)" if warm else "a new pod"
    rows = [f"crictl, one process per call, {title}: medians of {rounds} rounds (same run, "
            "alternating)", "", "| op | criserver | containerd | ratio | target | met |",
            "|---|---:|---:|---:|---:|---|"]
    for label, ops, target in TARGETS:
        if warm and not set(ops) <= set(CONTAINER_OPS):
            continue
        a, b = cri.median_ms(ops), ctrd.median_ms(ops)
        ratio = a / b
        rows.append(f"| {label} | {a:.0f} ms | {b:.0f} ms | {ratio:.1f}x | <= {target:g}x | "
                    f"{'yes' if ratio <= target else 'no'} |")
    return "\n".join(rows)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warm-rounds", type=int, default=None,
                    help="rounds timing a pod's second container (default: --rounds; 0: none)")
    ap.add_argument("--warm-pool", type=int, default=DEFAULTS.warm_pool,
                    help=f"criserver's warm_pool option (default {DEFAULTS.warm_pool}, the "
                         "daemon's; 0: no pool)")
    ap.add_argument("--tb-size", type=int, default=None,
                    help="criserver's tcg_tb_size_mib option (default: the handler's)")
    ap.add_argument("--vcpus", type=int, default=None,
                    help="criserver's default_vcpus option (default: the handler's)")
    args = ap.parse_args()
    warm_rounds = args.rounds if args.warm_rounds is None else args.warm_rounds
    crictl_binary()
    reg_dir = Path(tempfile.mkdtemp(prefix="crictlb-reg-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="crictlb-", dir="/tmp"))
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    try:
        await push_images(registry.base)
        image = f"{registry.host}/e2e/busybox:latest"
        with Containerd(registry.host, f"{registry.host}/bench/pause:latest",
                        cni_chain="builtin") as ctrd, \
                BenchDaemon(network=True, options={
                    "warm_pool": args.warm_pool,
                    **({"tcg_tb_size_mib": args.tb_size} if args.tb_size else {}),
                    **({"default_vcpus": args.vcpus} if args.vcpus else {})}) as crid:
            client = crid.daemon.client()
            try:
                await build_template(client, crid.workdir)
            finally:
                await client.close()
            sides = [Side("criserver", crid.daemon.socket, work / "criserver", args.warm_pool),
                     Side("containerd", ctrd.socket, work / "containerd")]
            for s in sides:
                s.crictl("pull", image)
                s.round(0, image, timed=False)
            for i in range(1, args.rounds + 1):
                for s in (sides if i % 2 else sides[::-1]):
                    s.round(i, image, timed=True)
                print(f"  round {i}/{args.rounds}", flush=True)
            print(report(sides[0], sides[1], args.rounds))
            warm = [Side(s.name, Path(s.endpoint.removeprefix("unix://")), s.work / "warm",
                         s.pool) for s in sides]
            for i in range(1, warm_rounds + 1):
                for s in (warm if i % 2 else warm[::-1]):
                    s.round(i, image, timed=True, warm=True)
                print(f"  warm round {i}/{warm_rounds}", flush=True)
            if warm_rounds:
                print()
                print(report(warm[0], warm[1], warm_rounds, warm=True))
    finally:
        _stop(registry)
        shutil.rmtree(reg_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
