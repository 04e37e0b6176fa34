"""Density (issue 16, step 5): N idle pods on this machine, criserver's micro-VMs against
containerd + runc in the same run.

    flock /tmp/criserver-vm.lock .venv/bin/python bench/density.py [--pods 110]
        [--concurrency 5] [--settle 20] [--idle 30] [--no-baseline]

Each runtime in turn (containerd first, then criserver; each torn down before the next starts)
gets N pods, C at a time (a new pod starts as soon as one of the C in flight is up), each one
RunPodSandbox, CreateContainer (busybox `sleep`), StartContainer through its CRI socket with the
same client (tests/cri_client.py). Per pod: the wall time of the three calls, by start order.
criserver is the real daemon with the micro-VM backend's defaults (templates, network and a warm
pool of one on, `--warm-pool` to change it; bench/pod_start.py's BenchDaemon on a private CNI
network), its template built by an untimed first pod; containerd is bench/containerd_kit.py's
private containerd (overlayfs), after an untimed first pod too. Both run the same CNI plugins,
criserver's built-in network's chain (bridge with masquerade and hairpin, host-local, portmap;
each adds loopback), as on a node where both read one CNI config. Images come from a local
docker-registry (bench/exec_baseline.py's push_images). Starting stops early when a pod fails
(after --max-failures) or the host's MemAvailable falls below --min-available GiB.

Once all are up: --settle seconds, then over --idle seconds the CPU time (utime + stime from
/proc) of each pod's processes: criserver, the pod's QEMU (the only per-pod host process);
containerd, the pod's shim and every process below it (pause, the container). Then PSS per pod
(criserver: bench/pod_memory.py's split of each QEMU, the template's unmapped pages shared out;
containerd: shim + pause + container from smaps_rollup) and each daemon's RSS. For criserver
also, as evidence of what wakes an idle pod: the CPU and context switches of QEMU's threads by
role, and the guest's interrupt and softirq rates read in one pod's container after the window.
Then every pod is stopped and removed (C at a time), criserver stopped (its pooled VM goes
with it), and nothing may be left: no QEMU, netns, CNI allocation, bridge port or pod file
(criserver); no shim, netns, IP or runc container (containerd).

Prints markdown tables: the figures against containerd with the issue's targets, latency by
decile of start order (median and p90), and the idle breakdown. Exit status 1 if anything was
left after teardown. The host has 2 shared cores: compare the ratios, not absolute times.
Needs root and: containerd (1.6.20), runc, containernetworking-plugins, docker-registry and the
guest assets (make guest).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.containerd_kit import Containerd
from bench.exec_baseline import pod_netns, push_images
from bench.pod_memory import measure as qemu_memory
from bench.pod_start import DEFAULTS, BenchDaemon, build_template, pct
from bench.procs import (
    CLK_TCK,
    children_ticks,
    cpu_ticks,
    descendants,
    host_busy_ticks,
    proc_table,
    pss_rss,
    thread_stats,
)
from tests.cri_client import CRIClient, msg
from tests.e2e.conftest import (
    backend_leftovers,
    bridge_ports,
    network_names,
    qemu_pids,
    qemus_of,
    vm_pids_of,
)
from tests.registry import _start_registry, _stop

GUEST_MIB = DEFAULTS.default_memory_mib + DEFAULTS.memory_overhead_mib
CALL_TIMEOUT = 900.0  # seconds: a pod start on a loaded TCG host can be slow, never hung
FIRST = 50  # the figures: 50 pods at 5 at a time


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable in /proc/meminfo")


@dataclass
class Pod:
    index: int  # start order, from 0
    name: str
    id: str = ""
    cid: str = ""
    started: float = 0.0  # seconds since the batch began
    runp: float = 0.0
    create: float = 0.0
    start: float = 0.0
    error: str = ""
    ok: bool = False  # all three calls returned

    @property
    def total(self) -> float:
        return self.runp + self.create + self.start

    @property
    def done(self) -> float:
        return self.started + self.total


@dataclass
class Idle:
    """What was measured once all pods were up and idle."""

    cpu: list[float] = field(default_factory=list)  # % of one core, per pod
    pss: list[float] = field(default_factory=list)  # MiB per pod
    daemon_cpu: float = 0.0  # % of one core
    daemon_rss: float = 0.0  # MiB, after the pods started
    daemon_rss_before: float = 0.0  # MiB, before the first timed pod
    notes: list[str] = field(default_factory=list)  # breakdown lines, markdown


@dataclass
class StartCPU:
    """Core-seconds the host spent while the pods started, and on what."""

    host: float = 0.0  # everything, all cores, the kernel's own work included
    pods: float = 0.0  # the pods' own processes and what they waited for
    daemon: float = 0.0  # the runtime daemon's threads
    helpers: float = 0.0  # processes the daemon ran and waited for (CNI plugins, shim starts)

    @property
    def rest(self) -> float:
        """The bench's client, the registry, kernel threads and interrupts."""
        return self.host - self.pods - self.daemon - self.helpers


@dataclass
class Side:
    """One runtime under test and what was measured on it."""

    name: str
    cri: CRIClient
    daemon_pid: int
    pods: list[Pod] = field(default_factory=list)
    stop_reason: str = ""
    reported: int = 0  # pods up, as the progress lines count them
    wall: float = 0.0  # all pods up (the last one's end)
    teardown: float = 0.0
    start_cpu: StartCPU = field(default_factory=StartCPU)
    idle: Idle = field(default_factory=Idle)
    leftovers: list[str] = field(default_factory=list)

    @property
    def up(self) -> list[Pod]:
        return [p for p in self.pods if p.ok]

    def first(self, n: int) -> list[Pod]:
        return [p for p in self.pods if p.index < n]

    def wall_first(self, n: int) -> float | None:
        """The time until the first n pods (in start order) were all up."""
        pods = self.first(n)
        if len(pods) < n or not all(p.ok for p in pods):
            return None
        return max(p.done for p in pods)

    def decile(self, d: int) -> list[float]:
        return [p.total for p in self.pods if 10 * d <= p.index < 10 * (d + 1) and p.ok]


async def start_pods(side: Side, image: str, n: int, concurrency: int, max_failures: int,
                     min_available: float, after_start: Callable[[Pod], Awaitable[None]]) -> None:
    """n pods, `concurrency` in flight; a slot takes the next index as soon as it is free."""
    next_index = 0
    t0 = time.monotonic()

    async def one(index: int) -> None:
        pod = Pod(index, f"dens-{side.name[:4]}-{index}")
        side.pods.append(pod)
        config = side.cri.pod_config(pod.name, hostname=pod.name)
        pod.started = time.monotonic() - t0
        try:
            t = time.monotonic()
            r = await side.cri.runtime.RunPodSandbox(
                msg("RunPodSandboxRequest", config=config), timeout=CALL_TIMEOUT)
            pod.id = r.pod_sandbox_id
            pod.runp, t = time.monotonic() - t, time.monotonic()
            c = await side.cri.runtime.CreateContainer(msg(
                "CreateContainerRequest", pod_sandbox_id=pod.id, sandbox_config=config,
                config=side.cri.container_config("idle", image=image,
                                                 command=["sleep", "1000000"])),
                timeout=CALL_TIMEOUT)
            pod.cid = c.container_id
            pod.create, t = time.monotonic() - t, time.monotonic()
            await side.cri.runtime.StartContainer(
                msg("StartContainerRequest", container_id=pod.cid), timeout=CALL_TIMEOUT)
            pod.start = time.monotonic() - t
            pod.ok = True
        except Exception as exc:
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
            pod.error = f"{type(exc).__name__}: {details}"
            print(f"  {side.name} pod {index + 1} failed after {time.monotonic() - t0:.0f} s: "
                  f"{pod.error}", flush=True)
            return
        await after_start(pod)
        side.reported += 1
        up = side.reported
        if up % 10 == 0 or up == n:
            print(f"  {side.name}: {up}/{n} up at {time.monotonic() - t0:.0f} s (pod {index + 1}"
                  f" {pod.total:.2f} s), MemAvailable {mem_available_gib():.1f} GiB", flush=True)

    async def slot() -> None:
        nonlocal next_index
        while next_index < n and not side.stop_reason:
            failed = sum(1 for p in side.pods if p.error)
            if failed >= max_failures:
                first_error = next(p.error for p in side.pods if p.error)
                side.stop_reason = f"{failed} pods failed (the first: {first_error})"
                break
            avail = mem_available_gib()
            if avail < min_available:
                side.stop_reason = (f"host MemAvailable {avail:.2f} GiB < {min_available} GiB "
                                    f"with {len(side.up)} pods up")
                break
            index, next_index = next_index, next_index + 1
            await one(index)

    await asyncio.gather(*(slot() for _ in range(concurrency)))
    side.pods.sort(key=lambda p: p.index)
    side.wall = max((p.done for p in side.up), default=0.0)
    if side.stop_reason:
        print(f"  {side.name}: stopped starting pods: {side.stop_reason}", flush=True)


async def start_pods_counted(side: Side, image: str, args: argparse.Namespace,
                             after_start: Callable[[Pod], Awaitable[None]],
                             pod_pids: Callable[[], list[int]]) -> None:
    """start_pods, and the host's CPU over it split by whose it was. `pod_pids`, called once all
    are up, gives the pods' processes: they all began in this phase, so their whole CPU time and
    their reaped children's count."""
    host0 = host_busy_ticks()
    daemon0, helpers0 = cpu_ticks(side.daemon_pid), children_ticks(side.daemon_pid)
    await start_pods(side, image, args.pods, args.concurrency, args.max_failures,
                     args.min_available, after_start)
    host1 = host_busy_ticks()
    daemon1, helpers1 = cpu_ticks(side.daemon_pid), children_ticks(side.daemon_pid)
    pods = sum(cpu_ticks(p) + children_ticks(p) for p in pod_pids())
    side.start_cpu = StartCPU(host=(host1 - host0) / CLK_TCK, pods=pods / CLK_TCK,
                              daemon=(daemon1 - daemon0) / CLK_TCK,
                              helpers=(helpers1 - helpers0) / CLK_TCK)


async def remove_pods(side: Side, concurrency: int) -> None:
    """Every pod the runtime lists, stopped and removed, `concurrency` at a time."""
    t0 = time.monotonic()
    ids = [p.id for p in (await side.cri.runtime.ListPodSandbox(timeout=60)).items]
    sem = asyncio.Semaphore(concurrency)

    async def one(pod_id: str) -> None:
        async with sem:
            try:
                await side.cri.runtime.StopPodSandbox(
                    msg("StopPodSandboxRequest", pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
                await side.cri.runtime.RemovePodSandbox(
                    msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
            except Exception as exc:  # the leftover check says what stayed
                print(f"  warning: removing {side.name} pod {pod_id[:12]}: {exc!r}", flush=True)

    await asyncio.gather(*(one(i) for i in ids))
    side.teardown = time.monotonic() - t0


def cpu_percent(before: int, after: int, seconds: float) -> float:
    return (after - before) / CLK_TCK / seconds * 100


async def idle_cpu(groups: dict[str, list[int]], daemon_pid: int, seconds: float,
                   threads_of: list[int]) -> tuple[dict[str, float], float,
                                                   dict[int, tuple[dict[int, tuple[int, int]],
                                                                   dict[int, tuple[int, int]]]]]:
    """% of one core over `seconds` of each group of processes (a pod) and of the daemon, and
    the per-thread (ticks, context switches) before and after of the `threads_of` processes."""
    pids = [p for g in groups.values() for p in g]
    threads0 = {pid: thread_stats(pid) for pid in threads_of}
    before = {pid: cpu_ticks(pid) for pid in [*pids, daemon_pid]}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    after = {pid: cpu_ticks(pid) for pid in [*pids, daemon_pid]}
    dt = time.monotonic() - t0
    threads1 = {pid: thread_stats(pid) for pid in threads_of}
    per_group = {name: cpu_percent(sum(before[p] for p in g), sum(after[p] for p in g), dt)
                 for name, g in groups.items()}
    daemon = cpu_percent(before[daemon_pid], after[daemon_pid], dt)
    return per_group, daemon, {pid: (threads0[pid], threads1[pid]) for pid in threads_of}


def thread_breakdown(samples: dict[int, tuple[dict[int, tuple[int, int]],
                                              dict[int, tuple[int, int]]]],
                     proc_cpu: dict[int, float], seconds: float) -> list[str]:
    """QEMU's threads by role, averaged over the pods: % of a core and context switches/s. QEMU
    runs without debug-threads, so threads are told apart by what they do: the main loop is the
    thread whose id is the pid; under TCG the vCPU thread has used by far the most CPU since the
    start; the rest (call_rcu, the thread pool's workers) are grouped."""
    roles: dict[str, list[float]] = {}
    wakes: dict[str, list[float]] = {}
    n = len(samples)
    for pid, (t0, t1) in samples.items():
        common = [tid for tid in t1 if tid in t0]
        others = sorted((tid for tid in common if tid != pid), key=lambda t: t1[t][0])
        vcpu = others[-1] if others else None
        summed = 0.0
        for tid in common:
            role = "main loop" if tid == pid else "vCPU (TCG)" if tid == vcpu else "other threads"
            cpu = cpu_percent(t0[tid][0], t1[tid][0], seconds)
            summed += cpu
            roles.setdefault(role, []).append(cpu)
            wakes.setdefault(role, []).append((t1[tid][1] - t0[tid][1]) / seconds)
        roles.setdefault("threads that came or went", []).append(
            max(0.0, proc_cpu.get(pid, 0.0) - summed))
    lines = ["| QEMU thread | CPU per pod (% of a core) | context switches/s per pod |",
             "|---|---|---|"]
    for role, values in roles.items():
        w = f"{sum(wakes[role]) / n:.1f}" if role in wakes else ""
        lines.append(f"| {role} | {sum(values) / n:.3f}% | {w} |")
    return lines


async def guest_interrupts(cri: CRIClient, cid: str, seconds: float) -> list[str]:
    """The guest's interrupt and softirq rates (/proc/interrupts, /proc/softirqs, read in a
    container: both are the guest kernel's), over `seconds`."""
    request = msg("ExecSyncRequest", container_id=cid,
                  cmd=["cat", "/proc/interrupts", "/proc/softirqs"], timeout=60)

    async def read() -> tuple[dict[str, int], float]:
        r = await cri.runtime.ExecSync(request, timeout=120)
        counts: dict[str, int] = {}
        for line in r.stdout.decode(errors="replace").splitlines():
            tokens = line.split()
            if not tokens or not tokens[0].endswith(":"):
                continue
            values = []
            for tok in tokens[1:]:
                if not tok.isdigit():
                    break
                values.append(int(tok))
            if values:
                label = tokens[0][:-1] + (f" ({' '.join(tokens[1 + len(values):])})"
                                          if len(tokens) > 1 + len(values) else "")
                counts[label] = sum(values)
        return counts, time.monotonic()

    c0, t0 = await read()
    await asyncio.sleep(seconds)
    c1, t1 = await read()
    rates = sorted(((k, (c1[k] - c0.get(k, 0)) / (t1 - t0)) for k in c1), key=lambda kv: -kv[1])
    r = await cri.runtime.ExecSync(msg(
        "ExecSyncRequest", container_id=cid, timeout=60, cmd=[
            "cat", "/sys/devices/system/clockevents/clockevent0/current_device",
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            "/proc/loadavg"]), timeout=120)
    event, source, loadavg = (r.stdout.decode(errors="replace").splitlines() + ["?"] * 3)[:3]
    return [f"guest: clock event device {event}, clocksource {source}, loadavg {loadavg}", "",
            "| guest interrupt / softirq | per second |", "|---|---|"] + [
        f"| {k} | {rate:.1f} |" for k, rate in rates if rate >= 0.05]


# -- the two runtimes -------------------------------------------------------------------------

async def run_containerd(args: argparse.Namespace, registry_host: str, image: str,
                         pause: str) -> Side:
    with Containerd(registry_host, pause, cni_chain="builtin") as ctrd:
        assert ctrd.process is not None
        side = Side("containerd", ctrd.client(), ctrd.process.pid)
        try:
            await side.cri.image.PullImage(
                msg("PullImageRequest", image=msg("ImageSpec", image=image)), timeout=300)
            warm = Side("containerd", side.cri, side.daemon_pid)  # untimed: pause, CNI's first
            await start_pods(warm, image, 1, 1, 1, 0.0, lambda p: track_netns(ctrd, side, p))
            await remove_pods(warm, 1)
            await asyncio.sleep(2)
            side.idle.daemon_rss_before = pss_rss(side.daemon_pid)[1] / 1024

            async def after(pod: Pod) -> None:
                await track_netns(ctrd, side, pod)

            def shims_and_below() -> list[int]:
                table = proc_table()
                return [p for shim in ctrd.shim_pids() for p in descendants(shim, table)]

            await start_pods_counted(side, image, args, after, shims_and_below)
            await settle(side, args)
            table = proc_table()
            groups = {str(shim): sorted(descendants(shim, table)) for shim in ctrd.shim_pids()}
            cpu, side.idle.daemon_cpu, _ = await idle_cpu(groups, side.daemon_pid, args.idle, [])
            side.idle.cpu = list(cpu.values())
            for pids in groups.values():
                side.idle.pss.append(sum(pss_rss(p)[0] for p in pids if os.path.exists(
                    f"/proc/{p}")) / 1024)
            side.idle.daemon_rss = pss_rss(side.daemon_pid)[1] / 1024
            side.idle.notes.append(
                f"containerd: {len(groups)} shims, {sum(len(g) for g in groups.values())} "
                "processes (shim, pause, container) counted")
            await remove_pods(side, args.concurrency)
            side.leftovers = containerd_leftovers(ctrd)
        finally:
            await side.cri.close()
    return side


async def track_netns(ctrd: Containerd, side: Side, pod: Pod) -> None:
    """containerd's pod netns, for the kit to remove if the pod is not."""
    if ns := await pod_netns(side.cri, pod.id):
        ctrd.netns_paths.add(ns)


def containerd_leftovers(ctrd: Containerd) -> list[str]:
    left = [f"shim {pid}" for pid in ctrd.shim_pids()]
    left += [f"netns {ns}" for ns in sorted(ctrd.netns_paths) if os.path.exists(ns)]
    left += [f"IP {p.name}" for p in (ctrd.work / "ipam").glob("*/*") if p.name[0].isdigit()]
    if ctrd.runc_root.exists():
        left += [f"runc container {c}" for c in os.listdir(ctrd.runc_root)]
    return left


async def run_criserver(args: argparse.Namespace, image: str) -> Side:
    with BenchDaemon(network=True, boot_timeout=600.0,
                     options={"warm_pool": args.warm_pool}) as bd:
        side = Side("criserver", bd.daemon.client(), bd.daemon.pid)
        try:
            await side.cri.image.PullImage(
                msg("PullImageRequest", image=msg("ImageSpec", image=image)), timeout=300)
            await build_template(side.cri, bd.workdir)
            await asyncio.sleep(2)
            side.idle.daemon_rss_before = pss_rss(side.daemon_pid)[1] / 1024

            async def nothing(pod: Pod) -> None:
                return None

            await start_pods_counted(side, image, args, nothing, lambda: [
                pid for p in side.up for pid in vm_pids_of(p.id)])
            await settle(side, args)
            groups = {p.id: vm_pids_of(p.id) for p in side.up}
            qemus = [pid for g in groups.values() for pid in g]
            cpu, side.idle.daemon_cpu, threads = await idle_cpu(
                groups, side.daemon_pid, args.idle, qemus)
            side.idle.cpu = list(cpu.values())
            proc_cpu = {g[0]: cpu[pod] for pod, g in groups.items() if len(g) == 1}
            side.idle.notes += thread_breakdown(threads, proc_cpu, args.idle)
            side.idle.notes.append("")
            usages = qemu_memory([p.id for p in side.up], GUEST_MIB, bd.workdir)
            side.idle.pss = [u.total for u in usages]
            side.idle.daemon_rss = pss_rss(side.daemon_pid)[1] / 1024
            kinds = sorted({k for u in usages for k in u.pss})
            side.idle.notes.append("QEMU PSS per pod by mapping (MiB): " + ", ".join(
                f"{k} {statistics.mean(u.pss.get(k, 0.0) for u in usages):.1f}" for k in kinds))
            side.idle.notes.append("")
            if side.up:
                try:
                    side.idle.notes += await guest_interrupts(side.cri, side.up[0].cid, 10.0)
                except Exception as exc:  # evidence only
                    side.idle.notes.append(f"(guest interrupts not read: {exc!r})")
            await remove_pods(side, args.concurrency)
            if args.warm_pool:
                side.idle.notes.append(f"The warm pool's VM (not in the per-pod figures): "
                                       f"{pool_usage(bd)}")
            code = bd.daemon.stop()  # the pool's VMs go with the daemon, as on a node
            side.leftovers = criserver_leftovers(bd) + ([f"daemon exit {code}"] if code else [])
        finally:
            await side.cri.close()
    return side


def pool_usage(bd: BenchDaemon) -> str:
    """PSS and RSS of the pooled VMs no pod took, as the pods' were read."""
    pids = [pid for pid, cmd in qemu_pids().items()
            if str(bd.workdir) in cmd and "-name pool-" in cmd]
    return ", ".join(f"PSS {pss / 1024:.1f} MiB, RSS {rss / 1024:.1f} MiB"
                     for pss, rss in map(pss_rss, pids)) or "none ready"


def criserver_leftovers(bd: BenchDaemon) -> list[str]:
    daemon = bd.daemon
    left = [f"QEMU {pid}" for pid in qemus_of(bd.workdir)]
    netns = daemon.state / "netns"
    if netns.exists():
        left += [f"netns {p.name}" for p in netns.iterdir()]
    network = network_names(daemon)[0]
    left += [f"IP {p.name}" for p in (Path("/var/lib/cni/networks") / network).glob("*")
             if p.name[0].isdigit()]
    left += [f"bridge port {p}" for p in bridge_ports(daemon)]
    left += [f"file {f}" for f in backend_leftovers(daemon) if not f.startswith("templates")]
    return left


async def settle(side: Side, args: argparse.Namespace) -> None:
    print(f"  {side.name}: {len(side.up)} pods up in {side.wall:.1f} s; settling "
          f"{args.settle:.0f} s, then measuring over {args.idle:.0f} s", flush=True)
    await asyncio.sleep(args.settle)


# -- the report -------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else ""


def fmt(v: float | None, unit: str, digits: int = 1) -> str:
    return "" if v is None else f"{v:.{digits}f}{unit}"


def p90_growth(side: Side) -> float | None:
    """p90 of pods 41-50 / p90 of pods 1-10."""
    first, fifth = side.decile(0), side.decile(4)
    if len(first) < 10 or len(fifth) < 10:
        return None
    return pct(fifth, 0.9) / pct(first, 0.9)


def per_pod(share: Callable[[StartCPU], float]) -> Callable[[Side], float]:
    """A share of the start phase's CPU, divided among the pods that came up."""
    return lambda side: share(side.start_cpu) / max(len(side.up), 1)


def report(args: argparse.Namespace, sides: list[Side], load: tuple[float, float]) -> None:
    base = sides[0] if len(sides) > 1 else None
    crs = sides[-1]
    version = subprocess.run(["containerd", "--version"], capture_output=True,
                             text=True).stdout.split()[2]
    print()
    print(f"{args.pods} pods per runtime, {args.concurrency} at a time, one busybox `sleep` "
          f"container each; settle {args.settle:.0f} s, idle window {args.idle:.0f} s; "
          f"containerd {version} + runc (overlayfs, CNI bridge) vs criserver micro-VM backend "
          f"(templates, network, warm pool of {args.warm_pool}; TCG). {os.cpu_count()} CPUs, "
          f"load average "
          f"{load[0]:.1f} -> {load[1]:.1f}.")
    print()
    cols = ["containerd", "criserver", "ratio"] if base else ["criserver"]
    print("| measure | " + " | ".join(cols) + " | target |")
    print("|" + "---|" * (len(cols) + 2))

    def row(label: str, get: Callable[[Side], float | None], unit: str, target: str,
            digits: int = 1, show_ratio: bool = True) -> None:
        c = get(crs)
        cells = [fmt(c, unit, digits)]
        if base:
            b = get(base)
            cells = [fmt(b, unit, digits), cells[0], ratio(c, b) if show_ratio else ""]
        print(f"| {label} | " + " | ".join(cells) + f" | {target} |")

    row("pods up", lambda s: float(len(s.up)), "", f"{args.pods}", 0, False)
    row(f"wall time, first {FIRST} pods", lambda s: s.wall_first(FIRST), " s", "<= 5x")
    row("p90 of pods 41-50 / p90 of pods 1-10", p90_growth, "x", "<= 1.5x", 2, False)
    row("wall time, all pods up", lambda s: s.wall, " s", "")
    row("per-pod runp+create+start, median", lambda s: statistics.median(
        [p.total for p in s.up]) if s.up else None, " s", "", 2)
    shares: list[tuple[str, Callable[[StartCPU], float]]] = [
        ("CPU while the pods started, per pod", lambda c: c.host),
        ("- of it the pod's processes (QEMU; shim and below)", lambda c: c.pods),
        ("- the daemon's threads", lambda c: c.daemon),
        ("- the daemon's helpers (CNI plugins; shim starts)", lambda c: c.helpers),
        ("- the rest (the bench's client, kernel threads, interrupts)", lambda c: c.rest)]
    for label, share in shares:
        row(label, per_pod(share), " core-s", "", 3)
    row("cores busy while the pods started", lambda s: 100 * s.start_cpu.host / (
        s.wall * (os.cpu_count() or 1)) if s.wall else None, "%", "", 0, False)
    row("idle CPU per pod, mean (% of a core)", lambda s: statistics.mean(
        s.idle.cpu) if s.idle.cpu else None, "%", "< 0.3%", 3)
    row("idle CPU per pod, max", lambda s: max(s.idle.cpu, default=None), "%", "", 3)
    row("idle CPU, all pods (% of a core)", lambda s: sum(s.idle.cpu) if s.idle.cpu else None,
        "%", "", 1)
    row("idle CPU, the daemon", lambda s: s.idle.daemon_cpu, "%", "", 2)
    row("PSS per pod, mean", lambda s: statistics.mean(s.idle.pss) if s.idle.pss else None,
        " MiB", "< 60 MiB")
    row("PSS, all pods", lambda s: sum(s.idle.pss) if s.idle.pss else None, " MiB", "", 0)
    row("daemon RSS before the pods", lambda s: s.idle.daemon_rss_before, " MiB", "")
    row("daemon RSS, all pods idle", lambda s: s.idle.daemon_rss, " MiB", "")
    row("teardown (stop + remove, all pods)", lambda s: s.teardown, " s", "")
    print("| left after teardown | " + " | ".join(
        ([", ".join(base.leftovers) or "nothing"] if base else [])
        + [", ".join(crs.leftovers) or "nothing"] + ([""] if base else [])) + " | nothing |")
    for s in sides:
        if s.stop_reason:
            print(f"\n{s.name} stopped starting pods: {s.stop_reason}")

    print()
    print("Per-pod runp+create+start by start order (seconds; criserver's three calls: median "
          "each)")
    print()
    head = "| pods | " + ("containerd p50 | p90 | " if base else "") + \
        "criserver p50 | p90 | " + ("ratio p50 | ratio p90 | " if base else "") + \
        "criserver runp / create / start p50 |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for d in range((args.pods + 9) // 10):
        c = crs.decile(d)
        parts = [p for p in crs.up if 10 * d <= p.index < 10 * (d + 1)]
        cells = [f"{10 * d + 1}-{min(10 * (d + 1), args.pods)}"]
        if base:
            b = base.decile(d)
            cells += [fmt(pct(b, 0.5), "", 2) if b else "", fmt(pct(b, 0.9), "", 2) if b else ""]
        cells += [fmt(pct(c, 0.5), "", 2) if c else "", fmt(pct(c, 0.9), "", 2) if c else ""]
        if base:
            cells += [ratio(pct(c, 0.5), pct(b, 0.5)) if b and c else "",
                      ratio(pct(c, 0.9), pct(b, 0.9)) if b and c else ""]
        cells.append(" / ".join(f"{statistics.median(getattr(p, k) for p in parts):.2f}"
                                for k in ("runp", "create", "start")) if parts else "")
        print("| " + " | ".join(cells) + " |")
    for s in sides:
        if s.idle.notes:
            print()
            print(f"{s.name}, idle:")
            print()
            print("\n".join(s.idle.notes))


async def run(args: argparse.Namespace) -> int:
    reg_dir = Path(tempfile.mkdtemp(prefix="dens-reg-", dir="/tmp"))
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    sides: list[Side] = []
    try:
        await push_images(registry.base)
        image = f"{registry.host}/e2e/busybox:latest"
        pause = f"{registry.host}/bench/pause:latest"
        load0 = os.getloadavg()[0]
        if not args.no_baseline:
            sides.append(await run_containerd(args, registry.host, image, pause))
        sides.append(await run_criserver(args, image))
        load1 = os.getloadavg()[0]
    finally:
        _stop(registry)
        shutil.rmtree(reg_dir, ignore_errors=True)
    report(args, sides, (load0, load1))
    return 1 if any(s.leftovers for s in sides) else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pods", type=int, default=110, help="pods per runtime (kubelet's max-pods)")
    ap.add_argument("--concurrency", type=int, default=5, help="pods starting at once")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds idle before measuring")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds the idle CPU is measured")
    ap.add_argument("--no-baseline", action="store_true", help="criserver only, no containerd")
    ap.add_argument("--warm-pool", type=int, default=DEFAULTS.warm_pool,
                    help=f"criserver's warm_pool option (default {DEFAULTS.warm_pool}, the "
                         "daemon's; 0: every pod a fresh clone)")
    ap.add_argument("--max-failures", type=int, default=3,
                    help="stop starting pods once this many failed")
    ap.add_argument("--min-available", type=float, default=2.0,
                    help="stop starting pods when the host's MemAvailable (GiB) is below this")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("runs VMs and containers: needs root")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
