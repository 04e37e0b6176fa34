"""How much guest code a new pod makes QEMU translate, step by step (issue 16's floor under TCG).

A clone's QEMU starts with an empty translation cache: every guest code path its pod takes is
translated once in that process, whatever any other pod already translated. This bench runs
the real daemon (micro-VM backend, templates and network on, no pool) with every QEMU behind
a wrapper that adds a human monitor socket, then N pods one after the other through runp,
create (busybox `sleep`), start and a first `exec true`, and after each call reads the pod's
QEMU: `info jit` (translated blocks, generated host code) and its CPU time. It prints the
medians per step.

    flock /tmp/criserver-vm.lock .venv/bin/python -m bench.translation [--pods 3] [--blocks]
        [--warm-pool]

`--blocks` also logs every translated block's guest address (`-d in_asm`, from the pods'
first call on, never the template's build; slow) and splits each step's blocks into the guest
kernel (by function and module, from the guest's /proc/kallsyms, read in a privileged
container at the end) and user space (executables linked at a fixed address, below 16 MiB: the
agent's python3, vmexec, busybox; position-independent executables such as crun, 0x55...;
shared libraries, 0x7f...).

`--warm-pool` gives the daemon a warm pool of one VM: each pod waits, untimed, for the pool to
be ready and gets its VM, whose translation cache already holds the pool's warm-up (the agent's
first calls, a container run in the VM's namespaces). Its steps count from just before runp:
what a pooled pod still translates for itself.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import re
import shutil
import socket
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.exec_baseline import push_images
from bench.pod_start import BenchDaemon, build_template, wait_pool
from tests.cri_client import CRIClient, msg
from tests.e2e.conftest import qemus_of, vm_pids_of
from tests.registry import _start_registry, _stop

STEPS = ("runp", "create", "start", "exec")
SECOND = ("create, 2nd container", "start, 2nd container", "exec, 2nd container")
POOLED = "the pooled VM before runp (restore, agent, warm-up)"
WRAPPER = """#!/bin/sh
if [ -e {dir}/log-blocks ]; then
  set -- "$@" -d in_asm,nochain -D {dir}/blocks-$$.log
fi
exec qemu-system-x86_64 "$@" -monitor unix:{dir}/hmp-$$.sock,server=on,wait=off
"""
HZ = os.sysconf("SC_CLK_TCK")
BLOCK = re.compile(rb"IN: [^\n]*\n(0x[0-9a-f]+):")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def monitor_counts(sock_path: str) -> dict[str, float]:
    """Of one QEMU, through its human monitor: translated blocks and generated code bytes
    (`info jit`), and the guest's disk reads (`info blockstats`, all drives)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        _until_prompt(s)
        s.sendall(b"info jit\n")
        jit = _until_prompt(s)
        s.sendall(b"info blockstats\n")
        disks = _until_prompt(s)
    tbs = re.search(r"TB count\s+(\d+)", jit)
    code = re.search(r"gen code size\s+(\d+)/", jit)
    if not tbs or not code:
        raise RuntimeError(f"unexpected `info jit` output: {jit[:300]!r}")
    return {"tbs": int(tbs[1]), "code": int(code[1]),
            "reads": sum(int(n) for n in re.findall(r"rd_operations=(\d+)", disks)),
            "read_bytes": sum(int(n) for n in re.findall(r"rd_bytes=(\d+)", disks))}


def _until_prompt(s: socket.socket) -> str:
    buf = b""
    while not buf.rstrip().endswith(b"(qemu)"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def monitor_of(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    spec = args[args.index(b"-monitor") + 1].decode()
    return spec.removeprefix("unix:").split(",", 1)[0]


class Symbols:
    """The guest kernel's text symbols (module code named by its module)."""

    def __init__(self, kallsyms: str) -> None:
        rows = []
        for line in kallsyms.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                rows.append((int(parts[0], 16), parts[3] if len(parts) > 3 else parts[2]))
        rows.sort()
        self._addrs = [a for a, _ in rows]
        self._names = [n for _, n in rows]

    def name(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        return self._names[i] if i >= 0 else "?"


def where(addr: int) -> str:
    if addr >= 0xFFFF800000000000:
        return "kernel"
    if addr < 0x1000000:
        return "fixed-address executables (the agent's python3, vmexec, busybox)"
    if 0x550000000000 <= addr < 0x570000000000:
        return "position-independent executables (crun)"
    return "shared libraries"


class Pod:
    """One pod's QEMU. `offsets`: where each step's blocks begin in its in_asm log (a clone's
    QEMU starts with its pod, so from 0; a pooled one's log begins before its pod)."""

    def __init__(self, pid: int, offsets: list[int]) -> None:
        self.pid = pid
        self.monitor = monitor_of(self.pid)
        self.log = Path(self.monitor.replace("/hmp-", "/blocks-").replace(".sock", ".log"))
        self.offsets = offsets

    def sample(self) -> dict[str, float]:
        counts = monitor_counts(self.monitor)
        if self.log.exists():
            self.offsets.append(self.log.stat().st_size)
        return {**counts, "cpu": cpu_seconds(self.pid)}

    def blocks(self) -> list[list[int]]:
        """Each step's translated block addresses, from the in_asm log."""
        data = self.log.read_bytes() if self.log.exists() else b""
        return [[int(m[1], 16) for m in BLOCK.finditer(data[a:b])]
                for a, b in zip(self.offsets, self.offsets[1:], strict=False)]


async def one_pod(cri: CRIClient, image: str, i: int, results: dict[str, list[dict[str, float]]],
                  pooled: int | None) -> Pod:
    """runp, then two containers, each created, started and exec'd into; between the two the
    pod idles 3 s (not measured). `pooled`: the warm pool's VM the pod will get, counted from
    just before runp; else the pod's clone is counted from its start."""
    last = (time.monotonic(), {"tbs": 0.0, "code": 0.0, "reads": 0.0, "read_bytes": 0.0,
                               "cpu": 0.0})

    def mark(step: str | None) -> None:
        nonlocal last
        now = (time.monotonic(), pod.sample())
        if step is not None:
            results[step].append({"wall": now[0] - last[0],
                                  **{k: now[1][k] - last[1][k] for k in now[1]}})
        last = now

    if pooled is not None:
        pod = Pod(pooled, [])
        mark(None)
        results[POOLED].append({"wall": 0.0, **last[1]})  # all it has run, from its start
    pod_id = await cri.run_pod(f"tr-{i}", hostname=f"tr-{i}")
    if pooled is None:
        pod = Pod(vm_pids_of(pod_id)[0], [0])
    mark("runp")
    for name, steps in (("first", STEPS[1:]), ("second", SECOND)):
        if name == "second":
            await asyncio.sleep(3)
            mark(None)
        cid = await cri.create_container(pod_id, name, pod_name=f"tr-{i}", image=image,
                                         command=["sleep", "100000"])
        mark(steps[0])
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid),
                                         timeout=120)
        mark(steps[1])
        await cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid, cmd=["true"],
                                       timeout=30), timeout=60)
        mark(steps[2])
    return pod


async def kernel_symbols(cri: CRIClient, image: str) -> Symbols:
    """/proc/kallsyms of a guest of the same kernel, read in a privileged container."""
    config: Any = cri.pod_config("tr-kallsyms")
    config.linux.security_context.privileged = True
    pod_id = (await cri.runtime.RunPodSandbox(msg("RunPodSandboxRequest", config=config),
                                              timeout=120)).pod_sandbox_id
    privileged = msg("LinuxContainerConfig", security_context=msg(
        "LinuxContainerSecurityContext", privileged=True))
    cid = (await cri.runtime.CreateContainer(msg(
        "CreateContainerRequest", pod_sandbox_id=pod_id, sandbox_config=config,
        config=cri.container_config("k", image=image, command=["sleep", "600"],
                                    linux=privileged)), timeout=120)).container_id
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid), timeout=120)
    reply = await cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid,
                                           cmd=["cat", "/proc/kallsyms"], timeout=60), timeout=120)
    return Symbols(reply.stdout.decode())


def report(results: dict[str, list[dict[str, float]]]) -> None:
    print("\n| step | wall ms | QEMU CPU ms | blocks translated | host code MiB | "
          "disk reads (KiB) |\n|---|---:|---:|---:|---:|---:|")
    for step in (POOLED, *STEPS, *SECOND):
        rows = results[step]
        if not rows:
            continue
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {step} | {1000 * med['wall']:.0f} | {1000 * med['cpu']:.0f} | "
              f"{med['tbs']:.0f} | {med['code'] / 2**20:.1f} | "
              f"{med['reads']:.0f} ({med['read_bytes'] / 1024:.0f}) |")
    total = {k: statistics.median(sum(results[s][i][k] for s in STEPS)
                                  for i in range(len(results["runp"])))
             for k in ("wall", "cpu", "tbs", "code", "reads", "read_bytes")}
    print(f"| runp to first exec | {1000 * total['wall']:.0f} | {1000 * total['cpu']:.0f} | "
          f"{total['tbs']:.0f} | {total['code'] / 2**20:.1f} | "
          f"{total['reads']:.0f} ({total['read_bytes'] / 1024:.0f}) |", flush=True)


def report_blocks(pods: list[Pod], symbols: Symbols) -> None:
    print("\nBlocks by where their guest code is (all pods' medians):\n")
    for n, step in enumerate(STEPS):
        per_pod = [p.blocks()[n] for p in pods if len(p.offsets) > len(STEPS)]
        if not per_pod:
            return
        kinds = [Counter(where(a) for a in addrs) for addrs in per_pod]
        split = ", ".join(f"{k} {statistics.median(c[k] for c in kinds):.0f}"
                          for k in sorted({k for c in kinds for k in c}))
        print(f"- **{step}**: {split}")
        kernel = Counter(symbols.name(a) for a in per_pod[0] if where(a) == "kernel")
        top = ", ".join(f"{name} {count}" for name, count in kernel.most_common(12))
        print(f"  - kernel, first pod, most blocks: {top}")


def pool_vm(workdir: Path, pods: set[int]) -> int:
    """The warm pool's one ready VM: the QEMU under `workdir` that is no pod's yet."""
    free = set(qemus_of(workdir)) - pods
    if len(free) != 1:
        raise RuntimeError(f"expected one pooled QEMU, found {sorted(free)}")
    return free.pop()


async def run(pods: int, blocks: bool, warm_pool: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tr-", dir="/tmp"))
    wrapper = tmp / "qemu"
    wrapper.write_text(WRAPPER.format(dir=tmp))
    wrapper.chmod(0o755)
    reg_dir = tmp / "registry"
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    try:
        await push_images(registry.base)
        image = f"{registry.host}/e2e/busybox:latest"
        options: dict[str, int | bool | str] = {"qemu_binary": str(wrapper),
                                                "warm_pool": int(warm_pool)}
        with BenchDaemon(network=True, options=options) as bd:
            cri = bd.daemon.client()
            try:
                await build_template(cri, bd.workdir)
                await cri.image.PullImage(msg("PullImageRequest", image=msg(
                    "ImageSpec", image=image)), timeout=300)
                if blocks:
                    (tmp / "log-blocks").touch()
                results: dict[str, list[dict[str, float]]] = defaultdict(list)
                started: list[Pod] = []
                # A pooled VM warmed before the log began is run through untimed.
                untimed = int(warm_pool and blocks)
                for i in range(untimed + pods):
                    await asyncio.sleep(3)  # the previous pod idle again
                    pooled = None
                    if warm_pool:
                        await wait_pool(cri, 1)
                        pooled = pool_vm(bd.workdir, {p.pid for p in started})
                    pod = await one_pod(cri, image, i, results if i >= untimed else
                                        defaultdict(list), pooled)
                    started.append(pod)
                    print(f"  pod {i + 1}/{untimed + pods} done", flush=True)
                started = started[untimed:]
                (tmp / "log-blocks").unlink(missing_ok=True)
                report(results)
                if blocks:
                    report_blocks(started, await kernel_symbols(cri, image))
            finally:
                await cri.close()
    finally:
        _stop(registry)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--blocks", action="store_true",
                    help="log each translated block's address and split them (slow)")
    ap.add_argument("--warm-pool", action="store_true",
                    help="each pod gets a VM of a warm pool of one (the microvm option "
                         "warm_pool = 1), counted from just before its runp")
    args = ap.parse_args()
    asyncio.run(run(args.pods, args.blocks, args.warm_pool))


if __name__ == "__main__":
    main()
