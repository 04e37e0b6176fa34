"""critest's own benchmark specs (`critest -benchmark`, cri-tools as `make tools` builds it)
against criserver (micro-VM pods, TCG here) and containerd + runc (Debian's 1.6.20, a private
instance: bench/containerd_kit.py), one after the other in the same run; per operation the
median and p90 of each, and criserver / containerd.

    .venv/bin/python -m bench.critest_benchmark [--pods 20] [--containers 20] [--images 20]
        [--scratch-runs 5] [--order containerd,criserver] [--out build/critest-benchmark]

Run it under `flock /tmp/criserver-vm.lock` (it boots VMs). The images critest names by their
upstream references (registry.k8s.io/e2e-test-images/busybox:1.29-2, pause:3.9, ...) are built
from the conformance assets (`make conformance-assets`) and pushed to a loopback
docker-registry; criserver reaches it through `[image] mirrors` (tests/conformance/conftest.py),
containerd through certs.d/<upstream>/hosts.toml, and its sandbox image is the mirrored
registry.k8s.io/pause:3.9.

The specs, all serial (NumParallel 1), each sample timed by critest itself (Go client):
- PodSandbox lifecycle (`--pods` samples): RunPodSandbox, PodSandboxStatus, StopPodSandbox,
  RemovePodSandbox of an empty pod.
- Container (`--containers` samples): each in a pod of its own (not timed), Create (with an
  ImageStatus first), Start, Status, Stop, Remove of a busybox `top` container.
- Image lifecycle (`--images` samples): PullImage, ImageStatus, RemoveImage of
  `PULL_IMAGE`; image listing: ListImages (`--images` samples).
- "start a container from scratch": RunPodSandbox + CreateContainer + StartContainer +
  StopPodSandbox + RemovePodSandbox as one duration, one sample per critest run after one
  untimed round; `--scratch-runs` - 1 more critest runs skip every other spec for more samples.
Before critest starts, each runtime is warmed up as a node would be: the test images pulled
and one pod run and removed (containerd pulls its pause image; criserver builds the template
its later pods are cloned from, its default configuration). critest runs with a fixed ginkgo
seed so both runtimes see the specs in the same order. critest's output, its JSON results and
report stay in `--out`/<runtime>/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.containerd_kit import Containerd
from bench.pod_start import build_template, pct
from tests.conformance.conftest import UPSTREAM_REGISTRIES, mirror_config
from tests.conformance.critest import read_report, summary
from tests.conformance.images import push_all
from tests.conformance.tools import cri_tool, cri_tools_version
from tests.cri_client import CRIClient, msg
from tests.e2e.conftest import running_vm_daemon
from tests.registry import Registry, _start_registry, _stop

REPO = Path(__file__).resolve().parents[1]
BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"  # critest's default test image
PAUSE = "registry.k8s.io/pause:3.9"
# Pulled and removed by the image lifecycle spec: its own layer (nginx and its libraries,
# ~9 MiB) on top of the busybox layer the runtimes already hold.
PULL_IMAGE = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
# ListImages runs with these present too (the image specs remove them afterwards).
LIST_IMAGES = [f"gcr.io/k8s-staging-cri-tools/test-image-{n}:latest" for n in (1, 2, 3)]
SCRATCH_SPEC = "start a container from scratch"
SCRATCH_MEASUREMENT = "create PodSandbox and container"
# The JSON files critest writes into -benchmarking-output-dir, in table order.
RESULT_FILES = {
    "pod_benchmark_data.json": "PodSandbox lifecycle",
    "container_benchmark_data.json": "Container",
    "image_lifecycle_benchmark_data.json": "Image lifecycle",
    "image_listing_benchmark_data.json": "Image listing",
}
SCRATCH_GROUP = "Pod + container from scratch"


@dataclass
class Results:
    """One runtime's samples: (spec group, operation) -> seconds, plus what critest said."""
    runtime: str
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    specs: list[str] = field(default_factory=list)  # one line per critest run
    load: tuple[float, float] = (0.0, 0.0)
    wall: float = 0.0


def params_yaml(pods: int, containers: int, images: int) -> str:
    """critest's BenchmarkingParamsType (pkg/framework/test_context.go); JSON is YAML. The
    timeouts are generous: critest panics when a sample takes longer than its timeout, and
    a booted micro-VM under TCG takes ~5 s."""
    return json.dumps({
        "containersNumber": containers, "containersNumberParallel": 1,
        "containerBenchmarkTimeoutSeconds": 300,
        "podsNumber": pods, "podsNumberParallel": 1, "podBenchmarkTimeoutSeconds": 300,
        "imagesNumber": images, "imagesNumberParallel": 1, "imageBenchmarkTimeoutSeconds": 300,
        "imagePullingBenchmarkImage": PULL_IMAGE,
        "imageListingBenchmarkImages": LIST_IMAGES,
        "podContainerStartBenchmarkTimeoutSeconds": 300,
    }, indent=1)


def run_critest(critest: Path, endpoint: str, params: Path, out: Path, skip: str = "") -> str:
    """One `critest -benchmark` run into `out`; its spec states, summed up."""
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.json"
    argv = [str(critest), f"--runtime-endpoint={endpoint}", f"--image-endpoint={endpoint}",
            "-benchmark", f"-benchmarking-params-file={params}",
            f"-benchmarking-output-dir={out}", f"--ginkgo.json-report={report}",
            "--ginkgo.no-color", "--ginkgo.seed=1", "--ginkgo.timeout=60m"]
    if skip:
        argv.append(f"--ginkgo.skip={skip}")
    with open(out / "critest.log", "wb") as log:
        run = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=out, check=False)
    if not report.exists():
        tail = (out / "critest.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"critest exited {run.returncode} without a report:\n{tail}")
    results = read_report(report)
    failed = [r for r in results if r.state not in ("passed", "skipped")]
    for r in failed:
        print(f"    {r.state}: {r.name}: {r.message.strip()[:300]}", flush=True)
    return f"exit {run.returncode}: {summary(results)}"


def read_results(out: Path) -> dict[tuple[str, str], list[float]]:
    """The datapoints of critest's JSON result files, in seconds."""
    samples: dict[tuple[str, str], list[float]] = {}
    for name, group in RESULT_FILES.items():
        path = out / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for point in data["datapoints"]:
            for op, ns in zip(data["operationsNames"], point["operationsDurationsNs"],
                              strict=True):
                samples.setdefault((group, op), []).append(ns / 1e9)
    return samples


def scratch_durations(report: Path) -> list[float]:
    """The "from scratch" spec's measurement (a gmeasure experiment in a report entry)."""
    found = []
    for suite in json.loads(report.read_text()):
        for spec in suite.get("SpecReports") or []:
            if SCRATCH_SPEC not in spec.get("LeafNodeText", "") or spec["State"] != "passed":
                continue
            for entry in spec.get("ReportEntries") or []:
                experiment = json.loads(entry["Value"]["AsJSON"])
                for m in experiment.get("Measurements") or []:
                    if m.get("Name") == SCRATCH_MEASUREMENT:
                        found += [ns / 1e9 for ns in m.get("Durations") or []]
    return found


async def warm_up(socket: Path, template_dir: Path | None) -> None:
    """Pull the images critest uses without timing them; run and remove one pod (criserver:
    waiting for the template of the pod shape to be built)."""
    cri = CRIClient(socket)  # in this event loop: grpc.aio channels belong to one
    try:
        for image in [BUSYBOX, *LIST_IMAGES]:
            await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)),
                                      timeout=300)
        if template_dir is not None:
            await build_template(cri, template_dir)
        else:
            pod_id = await cri.run_pod("bench-warmup", hostname="bench-warmup")
            await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
            await cri.runtime.RemovePodSandbox(
                msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    finally:
        await cri.close()


def bench_runtime(name: str, endpoint: str, out: Path, params: Path,
                  scratch_runs: int) -> Results:
    """critest once with every benchmark spec, then `scratch_runs` - 1 more runs of the
    from-scratch spec alone."""
    critest = cri_tool("critest")
    res = Results(name)
    shutil.rmtree(out, ignore_errors=True)
    load0, t0 = os.getloadavg()[0], time.monotonic()
    print(f"  {name}: critest -benchmark, all specs", flush=True)
    res.specs.append(run_critest(critest, endpoint, params, out / "all"))
    res.samples = read_results(out / "all")
    scratch = scratch_durations(out / "all" / "report.json")
    for i in range(1, scratch_runs):
        print(f"  {name}: critest -benchmark, from scratch only ({i + 1}/{scratch_runs})",
              flush=True)
        run_out = out / f"scratch-{i + 1}"
        res.specs.append(run_critest(critest, endpoint, params, run_out, skip="operations on"))
        scratch += scratch_durations(run_out / "report.json")
    if scratch:
        res.samples[(SCRATCH_GROUP, "RunPodSandbox .. RemovePodSandbox")] = scratch
    res.load, res.wall = (load0, os.getloadavg()[0]), time.monotonic() - t0
    print(f"  {name}: {'; '.join(res.specs)} ({res.wall:.0f} s)", flush=True)
    return res


@contextmanager
def containerd_endpoint(registry: Registry) -> Iterator[str]:
    with Containerd(registry.host, PAUSE, mirrors=UPSTREAM_REGISTRIES) as ctrd:
        asyncio.run(warm_up(ctrd.socket, None))
        yield f"unix://{ctrd.socket}"


@contextmanager
def criserver_endpoint(registry: Registry) -> Iterator[str]:
    with running_vm_daemon(mirror_config(registry)) as daemon:
        asyncio.run(warm_up(daemon.socket, daemon.workdir))
        yield f"unix://{daemon.socket}"


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), pct(values, 0.9)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def table(base: Results, other: Results) -> list[str]:
    """Markdown: per operation, n, median and p90 of each runtime, other / base."""
    lines = [f"| spec | operation | n | {base.runtime} median ms | p90 ms "
             f"| {other.runtime} median ms | p90 ms | median ratio | p90 ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys([*base.samples, *other.samples]):
        a, b = base.samples.get(key), other.samples.get(key)
        if not a or not b:
            lines.append(f"| {key[0]} | {key[1]} | | {'missing' if not a else ''} | "
                         f"| {'missing' if not b else ''} | | | |")
            continue
        (a50, a90), (b50, b90) = stats(a), stats(b)
        n = str(len(a)) if len(a) == len(b) else f"{len(a)}/{len(b)}"
        lines.append(f"| {key[0]} | {key[1]} | {n} | {ms(a50)} | {ms(a90)} | {ms(b50)} "
                     f"| {ms(b90)} | {b50 / a50:.2f}x | {b90 / a90:.2f}x |")
    return lines


def containerd_version() -> str:
    out = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout
    return out.split()[2] if len(out.split()) > 2 else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pods", type=int, default=20, help="podsNumber (samples)")
    ap.add_argument("--containers", type=int, default=20, help="containersNumber (samples)")
    ap.add_argument("--images", type=int, default=20, help="imagesNumber (samples)")
    ap.add_argument("--scratch-runs", type=int, default=5,
                    help="critest runs giving a from-scratch sample each (the first runs all)")
    ap.add_argument("--order", default="containerd,criserver",
                    help="which runtime goes first (comma-separated)")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "critest-benchmark",
                    help="critest's logs, JSON results and reports, per runtime")
    args = ap.parse_args()
    order = args.order.split(",")
    if sorted(order) != ["containerd", "criserver"]:
        ap.error("--order names containerd and criserver")

    reg_dir = Path(tempfile.mkdtemp(prefix="critb-reg-", dir="/tmp"))
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    results: dict[str, Results] = {}
    t0 = time.monotonic()
    try:
        asyncio.run(push_all(registry.base))
        args.out.mkdir(parents=True, exist_ok=True)
        params = args.out / "params.yaml"
        params.write_text(params_yaml(args.pods, args.containers, args.images))
        endpoints = {"containerd": containerd_endpoint, "criserver": criserver_endpoint}
        for name in order:
            print(f"{name}: starting, warming up", flush=True)
            with endpoints[name](registry) as endpoint:
                results[name] = bench_runtime(name, endpoint, args.out / name, params,
                                              args.scratch_runs)
    finally:
        _stop(registry)
        shutil.rmtree(reg_dir, ignore_errors=True)

    base, other = results["containerd"], results["criserver"]
    print()
    print(f"critest {cri_tools_version()} `-benchmark`, serial; pods {args.pods}, containers "
          f"{args.containers}, images {args.images} samples, from scratch {args.scratch_runs}; "
          f"containerd {containerd_version()} + runc (overlayfs, CNI bridge) and criserver "
          f"(micro-VM backend, TCG, templates) one after the other in one run, {order[0]} "
          f"first ({time.monotonic() - t0:.0f} s). Load average: " + ", ".join(
              f"{r.runtime} {r.load[0]:.1f} -> {r.load[1]:.1f} ({r.wall:.0f} s)"
              for r in (base, other)) + ".")
    print()
    print("\n".join(table(base, other)))
    print()
    for r in (base, other):
        print(f"{r.runtime}: critest {'; '.join(r.specs)}")
    if any("failed" in s or "panicked" in s or "timedout" in s
           for r in (base, other) for s in r.specs):
        sys.exit(1)


if __name__ == "__main__":
    main()
