"""Where the time of a pod's lifecycle goes (issue 16, step 1): the real daemon (micro-VM
backend, templates and network on, as by default) with `[daemon] trace = true`, N pods each
through runp, create, start, exec, stop, rm, stopp, rmp with a busybox container, and per CRI
call a markdown table of the median total and the median of each step from the daemon's
`trace rpc=...` lines:

- host steps (lock, db_write, image_lookup, spec, vm_restore, ...): the daemon's own work;
- `agent.<Call>`: an agent call's round trip as the host sees it, and inside it
  `guest.<Call>.<step>`: what the agent timed itself (oci_create, rootfs, ...); the agent
  call minus its guest steps is the channel, grpclib and the agent's dispatch;
- `(other)`: the total minus the host steps and agent round trips (CRI decode, awaits between
  steps, whatever is not yet spanned).

In RunPodSandbox `agent.Check` runs inside `wait_ready` and is left out of `(other)`.
ExecSync is not traced: its client-observed time is shown for scale.

    flock /tmp/criserver-vm.lock .venv/bin/python bench/lifecycle_breakdown.py [--pods 10]

`--warm-pool N`: with the microvm option `warm_pool` (each pod waits, untimed, for the pool to
be full again first), to see what a pod given a warmed VM still pays.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pod_start import BenchDaemon, build_template, wait_pool  # noqa: E402

from tests.cri_client import CRIClient, msg  # noqa: E402
from tests.image.oci import Pusher  # noqa: E402
from tests.registry import _start_registry, _stop, busybox_full_image  # noqa: E402

CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer",
         "RemoveContainer", "StopPodSandbox", "RemovePodSandbox")
# Steps inside another step of the same call: not added again into (other).
NESTED = ("agent.Check",)


def parse_trace(line: str) -> tuple[str, dict[str, float]] | None:
    """("CreateContainer", {"total_ms": .., step: ms, ...}) of one daemon log line."""
    if "trace rpc=" not in line or " code=OK " not in line:
        return None
    fields = dict(tok.split("=", 1) for tok in line.split("trace ", 1)[1].split() if "=" in tok)
    steps: dict[str, float] = {}
    for key, value in fields.items():
        if key in ("rpc", "pod", "container", "code"):
            continue
        try:
            steps[key] = float(value)
        except ValueError:
            continue
    return fields["rpc"], steps


def side(step: str) -> str:
    if step.startswith("guest."):
        return "guest"
    if step.startswith("agent."):
        return "agent RTT"
    return "host"


def table(rpc: str, samples: list[dict[str, float]], client: list[float]) -> str:
    by_step: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for step, ms in s.items():
            if step != "total_ms":
                by_step[step].append(ms)
        top = sum(ms for step, ms in s.items()
                  if step != "total_ms" and not step.startswith("guest.") and step not in NESTED)
        by_step["(other)"].append(s["total_ms"] - top)
        for step in [k for k in s if k.startswith("agent.")]:
            call = step.removeprefix("agent.")
            inside = sum(ms for k, ms in s.items() if k.startswith(f"guest.{call}."))
            if any(k.startswith(f"guest.{call}.") for k in s):
                by_step[f"agent.{call} - guest steps"].append(s[step] - inside)
    total = statistics.median(s["total_ms"] for s in samples)
    rows = [f"**{rpc}**: median {total:.1f} ms in the daemon, {statistics.median(client):.1f} ms "
            f"at the client (n={len(samples)})", "",
            "| step | side | median ms | share of total |", "|---|---|---:|---:|"]
    # Steps missing from some samples count as 0 there (e.g. a lock never waited for).
    medians = {step: statistics.median(v + [0.0] * (len(samples) - len(v)))
               for step, v in by_step.items()}
    for step, ms in sorted(medians.items(), key=lambda kv: -kv[1]):
        kind = "channel" if step.endswith(" - guest steps") else \
            "host" if step == "(other)" else side(step)
        rows.append(f"| {step} | {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
    return "\n".join(rows)


async def lifecycle(cri: CRIClient, image: str, i: int, client: dict[str, list[float]]) -> None:
    async def timed(rpc: str, call: Awaitable[Any]) -> Any:
        t0 = time.monotonic()
        result = await call
        client[rpc].append((time.monotonic() - t0) * 1000)
        return result

    rt = cri.runtime
    name = f"bd-{i}"
    pod_config = cri.pod_config(name, hostname=name)
    pod = (await timed("RunPodSandbox", rt.RunPodSandbox(
        msg("RunPodSandboxRequest", config=pod_config)))).pod_sandbox_id
    config = cri.container_config("c", image=image, command=["sleep", "3600"])
    ctr = (await timed("CreateContainer", rt.CreateContainer(msg(
        "CreateContainerRequest", pod_sandbox_id=pod, config=config,
        sandbox_config=pod_config)))).container_id
    await timed("StartContainer", rt.StartContainer(msg("StartContainerRequest",
                                                        container_id=ctr)))
    reply = await timed("ExecSync", rt.ExecSync(msg("ExecSyncRequest", container_id=ctr,
                                                    cmd=["true"], timeout=30)))
    assert reply.exit_code == 0, reply
    await timed("StopContainer", rt.StopContainer(msg("StopContainerRequest", container_id=ctr,
                                                      timeout=2)))
    await timed("RemoveContainer", rt.RemoveContainer(msg("RemoveContainerRequest",
                                                          container_id=ctr)))
    await timed("StopPodSandbox", rt.StopPodSandbox(msg("StopPodSandboxRequest",
                                                        pod_sandbox_id=pod)))
    await timed("RemovePodSandbox", rt.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                            pod_sandbox_id=pod)))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pods", type=int, default=10)
    ap.add_argument("--warm-pool", type=int, default=0)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="crbd-", dir="/tmp"))
    registry = _start_registry(scratch / "registry", htpasswd=False)
    try:
        async with aiohttp.ClientSession() as session:
            await Pusher(session, registry.base).image("bench/busybox", "latest",
                                                       busybox_full_image())
        image = f"{registry.host}/bench/busybox:latest"
        with BenchDaemon(network=True, daemon_keys="trace = true\n",
                         options={"warm_pool": args.warm_pool}) as bd:
            cri = bd.daemon.client()
            try:
                await cri.image.PullImage(msg("PullImageRequest",
                                              image=msg("ImageSpec", image=image)))
                await build_template(cri, bd.workdir)
                mark = len(bd.daemon.log())
                client: dict[str, list[float]] = defaultdict(list)
                for i in range(args.pods):
                    await wait_pool(cri, args.warm_pool)
                    await lifecycle(cri, image, i, client)
                    print(f"  pod {i + 1}/{args.pods} done", flush=True)
            finally:
                await cri.close()
            log = bd.daemon.log()[mark:]
    finally:
        _stop(registry)
        shutil.rmtree(scratch, ignore_errors=True)
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    for line in log.splitlines():
        parsed = parse_trace(line)
        if parsed is not None:
            samples[parsed[0]].append(parsed[1])
    print()
    for rpc in CALLS:
        if samples[rpc]:
            print(table(rpc, samples[rpc], client[rpc]))
            print()
    print(f"**ExecSync** (not traced): median {statistics.median(client['ExecSync']):.1f} ms "
          f"at the client")


if __name__ == "__main__":
    asyncio.run(main())
