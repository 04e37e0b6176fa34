"""Pod start as kubelet sees it (issue 15): the time from dropping a static pod manifest into a
kubelet's manifest directory to kubelet reporting the pod Running with its container running
(its read-only port's /pods, polled every 50 ms), for

    booted      criserver, a micro-VM that boots (templates off),
    clone       criserver, a micro-VM cloned from the template built after the first pod,
    containerd  containerd 1.6 + runc (bench/containerd_kit.py),

all under the same kubelet binary (`make kubelet`) in one run.

    .venv/bin/python -m bench.kubelet_pod_start [--runs 5]

Each round starts a kubelet on each runtime in turn (order reversed every other round, so host
load drifts hit all), times one pod (busybox `sleep`, image already pulled by an untimed
warm-up pod), removes its manifest, waits until kubelet stopped it, removes the sandbox through
the CRI and stops kubelet. Images come from the test registry (the conformance images, mirrored
for registry.k8s.io), containerd's sandbox image is its pause:3.9. Prints medians and ratios to
containerd. Needs root, the guest assets, kubelet, containerd 1.6, runc, CNI plugins, and takes
the VM lock (/tmp/criserver-vm.lock). The host has 2 shared cores: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from bench.containerd_kit import Containerd
from tests.conformance.conftest import UPSTREAM_REGISTRIES, mirror_config
from tests.conformance.images import push_all
from tests.cri_client import msg
from tests.daemon import Daemon, built_templates
from tests.e2e.conftest import microvm_config, require_assets, short_workdir, tear_down
from tests.kubelet.node import (
    BUSYBOX,
    VM_LOCK,
    KubeletNode,
    in_thread,
    kubelet_binary,
    pod_manifest,
    running_node,
    runtime_pods,
    statuses,
    wait_for,
)
from tests.registry import Registry, _start_registry, _stop

POLL = 0.05
SIDES = ("booted", "clone", "containerd")
PAUSE = "registry.k8s.io/pause:3.9"
CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer")
CALL_LINE = re.compile(r"rpc=(\w+) .*code=OK duration_ms=([\d.]+)")


def sleeper(name: str) -> dict[str, Any]:
    """The pod every side runs: the same spec, so every clone fits the first pod's template."""
    return pod_manifest(name, [{"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]}])


def running(pod: dict[str, Any] | None) -> bool:
    return (pod is not None and pod.get("status", {}).get("phase") == "Running"
            and all("running" in s.get("state", {}) for s in statuses(pod).values())
            and len(statuses(pod)) == 1)


def time_to_running(node: KubeletNode, name: str, timeout: float = 300) -> float:
    """Drop the manifest; poll /pods every 50 ms until the pod is Running; seconds taken."""
    t0 = time.monotonic()
    node.write_manifest(sleeper(name))
    while True:
        if running(node.pod(name)):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"pod {name} not Running in {timeout} s\n{node.describe(name)}")
        time.sleep(POLL)


def remove(node: KubeletNode, name: str) -> None:
    """Remove the manifest, wait until kubelet stopped the pod's sandbox, then remove it
    through the CRI (kubelet's GC would, within a minute)."""
    node.remove_manifest(name)
    full = node.full_name(name)
    wait_for(lambda: not [p for p in runtime_pods(node.daemon)
                          if p.metadata.name == full and p.state == 0], 120,
             f"kubelet to stop pod {name}", lambda: node.describe(name))

    async def remove_sandboxes() -> None:
        cri = node.daemon.client()
        try:
            for p in (await cri.runtime.ListPodSandbox(timeout=30)).items:
                if p.metadata.name == full:
                    await cri.runtime.RemovePodSandbox(
                        msg("RemovePodSandboxRequest", pod_sandbox_id=p.id), timeout=120)
        finally:
            await cri.close()

    in_thread(remove_sandboxes)


@contextmanager
def vm_daemon(registry: Registry, templates: bool) -> Iterator[Daemon]:
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, templates=templates)
                    + mirror_config(registry)).start()
    try:
        yield daemon
    finally:
        tear_down(daemon, workdir)


def node_on(runtime: Any) -> AbstractContextManager[KubeletNode]:
    """A kubelet on `runtime` (a Daemon, or the containerd kit: kubelet needs only its socket
    and a CRI client)."""
    return running_node(runtime, kubelet_binary())


def wait_template(daemon: Daemon) -> None:
    t0 = time.monotonic()
    wait_for(lambda: built_templates(daemon.state), 300,
             "the template criserver builds after the first pod")
    print(f"  template ready {time.monotonic() - t0:.0f} s after the warm-up pod ran", flush=True)


def call_seconds(daemon: Daemon, offset: int) -> dict[str, float]:
    """criserver's own time in the calls that start a pod, from its log after byte `offset`
    (one line per CRI call with its duration)."""
    with open(daemon.log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    found: dict[str, float] = {}
    for match in CALL_LINE.finditer(text):
        if match[1] in CALLS:
            found[match[1]] = found.get(match[1], 0.0) + float(match[2]) / 1000
    return found


def report(samples: dict[str, list[float]]) -> None:
    base = statistics.median(samples["containerd"])
    print("\n| pod | runs | median | min | max | ratio to containerd (median) |")
    print("|---|---|---|---|---|---|")
    labels = {"booted": "criserver, micro-VM booted", "clone": "criserver, micro-VM cloned",
              "containerd": "containerd 1.6 + runc"}
    for side in SIDES:
        values = samples[side]
        med = statistics.median(values)
        print(f"| {labels[side]} | {len(values)} | {med:.2f} s | {min(values):.2f} s | "
              f"{max(values):.2f} s | {med / base:.2f}x |")
    print("\ncriserver's own time in the CRI calls of those starts (its log), medians:\n")
    print(f"| pod | {' | '.join(CALLS)} | the rest (kubelet, polling) |")
    print("|---|---|---|---|---|")
    for side in ("booted", "clone"):
        calls = [statistics.median(samples.get(f"{side}:{c}", [0.0])) for c in CALLS]
        rest = statistics.median(samples[side]) - sum(calls)
        print(f"| {labels[side]} | {' | '.join(f'{c:.2f} s' for c in calls)} | {rest:.2f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    require_assets()
    if not kubelet_binary().exists():
        raise SystemExit(f"{kubelet_binary()} is missing: run `make kubelet`")
    with open(VM_LOCK, "a") as lock:
        print(f"waiting for {VM_LOCK}...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        scratch = Path(tempfile.mkdtemp(prefix="kpb-", dir="/tmp"))
        registry = _start_registry(scratch / "registry", htpasswd=False)
        try:
            asyncio.run(push_all(registry.base))
            with vm_daemon(registry, templates=False) as booted, \
                    vm_daemon(registry, templates=True) as cloning, \
                    Containerd(registry.host, PAUSE, mirrors=UPSTREAM_REGISTRIES) as containerd:
                runtimes: dict[str, Any] = {"booted": booted, "clone": cloning,
                                            "containerd": containerd}
                samples = run(runtimes, args.runs, lambda: wait_template(cloning))
            report(samples)
        finally:
            _stop(registry)
            shutil.rmtree(scratch, ignore_errors=True)


def run(runtimes: dict[str, Any], runs: int,
        template_ready: Callable[[], None]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {side: [] for side in SIDES}
    print("warm-up: one untimed pod per runtime (image pull; the clone side's template)",
          flush=True)
    for side in SIDES:
        with node_on(runtimes[side]) as node:
            took = time_to_running(node, f"warm-{side}")
            print(f"  {side}: {took:.2f} s", flush=True)
            if side == "clone":
                template_ready()
            remove(node, f"warm-{side}")
    for i in range(runs):
        order = SIDES if i % 2 == 0 else tuple(reversed(SIDES))
        line = []
        for side in order:
            runtime = runtimes[side]
            with node_on(runtime) as node:
                name = f"bench-{side}-{i}"
                offset = runtime.log_path.stat().st_size if isinstance(runtime, Daemon) else 0
                took = time_to_running(node, name)
                samples[side].append(took)
                if isinstance(runtime, Daemon):
                    for call, seconds in call_seconds(runtime, offset).items():
                        samples.setdefault(f"{side}:{call}", []).append(seconds)
                line.append(f"{side} {took:.2f} s")
                remove(node, name)
        print(f"  run {i + 1}: " + ", ".join(line), flush=True)
    return samples


if __name__ == "__main__":
    main()
