"""criserver's runc backend against containerd + runc, in one run (issue 14, plan step 10):
RunPodSandbox, CreateContainer + StartContainer, ExecSync `true`, StopPodSandbox +
RemovePodSandbox latency, and host memory per idle pod.

    .venv/bin/python -m bench.runc_backend [--pods 20] [--execs 100] [--block 5]
                                           [--exec-block 10] [--idle 10] [--cni plain|builtin]
                                           [--ctrmon PATH] [--daemon-log PATH]

Both runtimes are driven through their CRI socket by the same client (tests/cri_client.py) with
what kubelet sends: pods with a log directory and pid namespace mode CONTAINER (so criserver
starts its infra container, as containerd starts pause), each with a CNI bridge network of its
own with the same plugin chain on both sides (--cni plain: containerd_kit's bridge + host-local;
--cni builtin: criserver's built-in bridge with masquerade and hairpin, then portmap; loopback
is added by both runtimes); one busybox `sleep` container per pod (pid CONTAINER), logging to a
file. Images come from
a local docker-registry (bench/exec_baseline.py's push_images); containerd's sandbox image is
that registry's pause-like busybox `sleep` (registry.k8s.io is unreachable here). criserver runs
the runc handler with ctrmon built from this checkout (or --ctrmon).

Latencies are client-observed. Pods start in blocks of --block per runtime, alternating, the
order reversed each round, so both runtimes start each block with as many pods already running;
after a warm-up pod each. ExecSync goes to the first pod's container, in blocks of --exec-block;
a third line times `runc exec <containerd's container> true` directly (runc's floor, no CRI).
After --idle seconds with all N pods idle, memory per pod (PSS, /proc/PID/smaps_rollup) counts
only what a pod costs beyond its container's own processes (the same `sleep` on both sides):
  criserver: every ctrmon process of the pod (the container's monitor, the infra container's
             monitor) and the infra process itself (`ctrmon pause`);
  containerd: the pod's containerd-shim-runc-v2 and its sandbox process (the pause-like sleep).
A second line adds each daemon's RSS growth (before the first timed pod -> all idle) / N.
Kernel objects (netns, veth, cgroups, mounts) are alike on both sides and not counted.
The host has 2 noisy shared cores: compare the ratios, not absolute times.

Needs root and: containerd (1.6.20), runc, containernetworking-plugins, docker-registry, gcc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from bench.containerd_kit import Containerd, cni_conflist
from bench.exec_baseline import pod_netns, push_images, runc_exec, timed
from bench.pod_start import pct
from bench.procs import proc_table, pss_rss, rss_kib
from criserver.backends.runc.build import build_ctrmon
from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon, unmount_under
from tests.e2e.conftest import handler_config, network_config, network_names
from tests.registry import _start_registry, _stop

PAUSE_ARGV = ["/bin/sleep", "2147483647"]  # push_images' pause-like image (containerd's sandbox)
INFRA_ARGV = ["/pause", "pause"]  # criserver's infra process (criserver/backends/runc/infra.py)


@cache
def pid_container() -> int:
    return enum("CONTAINER")  # compiles the proto each call (~60 ms): once, outside the timing


def namespace_options() -> object:
    return msg("NamespaceOption", pid=pid_container())


def pod_config(name: str, log_dir: Path) -> object:
    return msg("PodSandboxConfig",
               metadata=msg("PodSandboxMetadata", name=name, namespace="bench", uid=f"uid-{name}"),
               hostname=name, log_directory=str(log_dir),
               linux=msg("LinuxPodSandboxConfig", security_context=msg(
                   "LinuxSandboxSecurityContext", namespace_options=namespace_options())))


def container_config(image: str) -> object:
    return msg("ContainerConfig", metadata=msg("ContainerMetadata", name="sleeper"),
               image=msg("ImageSpec", image=image), command=["sleep", "100000"],
               log_path="sleeper.log",
               linux=msg("LinuxContainerConfig", security_context=msg(
                   "LinuxContainerSecurityContext", namespace_options=namespace_options())))


@dataclass
class Pod:
    id: str
    cid: str = ""


@dataclass
class Side:
    """One runtime under test and what was measured on it."""

    name: str
    cri: CRIClient
    daemon_pid: int
    logs: Path
    pods: list[Pod] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    rss_before: int = 0  # KiB

    def add(self, what: str, seconds: float) -> None:
        self.samples.setdefault(what, []).append(seconds)

    async def start_pod(self, name: str, image: str, timed_: bool = True) -> Pod:
        log_dir = self.logs / name
        log_dir.mkdir(parents=True)
        config = pod_config(name, log_dir)
        cconfig = container_config(image)
        t0 = time.perf_counter()
        r = await self.cri.runtime.RunPodSandbox(msg("RunPodSandboxRequest", config=config),
                                                 timeout=120)
        t1 = time.perf_counter()
        pod = Pod(r.pod_sandbox_id)
        self.pods.append(pod)
        c = await self.cri.runtime.CreateContainer(msg(
            "CreateContainerRequest", pod_sandbox_id=pod.id, config=cconfig,
            sandbox_config=config), timeout=120)
        t2 = time.perf_counter()
        pod.cid = c.container_id
        await self.cri.runtime.StartContainer(
            msg("StartContainerRequest", container_id=pod.cid), timeout=120)
        t3 = time.perf_counter()
        if timed_:
            self.add("RunPodSandbox", t1 - t0)
            self.add("CreateContainer", t2 - t1)
            self.add("StartContainer", t3 - t2)
            self.add("CreateContainer + StartContainer", t3 - t1)
        return pod

    async def remove_pod(self, pod: Pod, timed_: bool = True) -> None:
        t0 = time.perf_counter()
        await self.cri.runtime.StopPodSandbox(
            msg("StopPodSandboxRequest", pod_sandbox_id=pod.id), timeout=120)
        await self.cri.runtime.RemovePodSandbox(
            msg("RemovePodSandboxRequest", pod_sandbox_id=pod.id), timeout=120)
        if timed_:
            self.add("StopPodSandbox + RemovePodSandbox", time.perf_counter() - t0)
        self.pods.remove(pod)

    async def remove_all(self) -> None:
        """Whatever is left (after a failure): every pod the runtime lists."""
        try:
            for p in (await self.cri.runtime.ListPodSandbox(timeout=30)).items:
                await self.cri.runtime.StopPodSandbox(
                    msg("StopPodSandboxRequest", pod_sandbox_id=p.id), timeout=120)
                await self.cri.runtime.RemovePodSandbox(
                    msg("RemovePodSandboxRequest", pod_sandbox_id=p.id), timeout=120)
        except Exception as exc:  # the kits kill what is left
            print(f"  warning: removing {self.name}'s pods: {exc!r}", flush=True)


class RuncDaemon:
    """criserver with the runc handler as default, on a CNI network of its own, in a short work
    dir. `close` kills the daemon, any monitor and runc container left (its pods are removed
    through the CRI before), and its mounts, bridge and IPAM dir."""

    def __init__(self, ctrmon: Path | None, cni: str, keep_log: Path | None = None) -> None:
        self.keep_log = keep_log
        self.workdir = Path(tempfile.mkdtemp(prefix="crr-", dir="/tmp"))
        if ctrmon is None:
            ctrmon = self.workdir / "ctrmon"
            build_ctrmon(ctrmon)
        self.ctrmon = ctrmon
        net = network_config(self.workdir)
        config = ('[runtime]\ndefault_handler = "runc"\n' + net
                  + handler_config("runc", "runc", monitor=str(ctrmon)))
        self.daemon = Daemon(self.workdir, config=config)
        if cni == "plain":  # a file in the conf dir replaces the built-in network
            network, bridge = network_names(self.daemon)
            subnet = re.search(r'default_subnet = "([\d./]+)"', net)
            assert subnet is not None
            (self.workdir / "net.d").mkdir()
            (self.workdir / "net.d" / "10-bench.conflist").write_text(
                cni_conflist(network, bridge, subnet[1], self.workdir / "ipam", cni))

    def __enter__(self) -> RuncDaemon:
        try:
            self.daemon.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def monitors(self) -> list[int]:
        """This daemon's ctrmon processes (their --root is under its work dir)."""
        marker = str(self.workdir).encode()
        return [pid for pid, (_, argv) in proc_table().items()
                if argv and argv[0].endswith(b"ctrmon") and any(marker in a for a in argv)]

    def close(self) -> None:
        self.daemon.kill()
        if self.keep_log is not None and self.daemon.log_path.exists():
            shutil.copyfile(self.daemon.log_path, self.keep_log)
        for pid in self.monitors():  # monitors survive the daemon by design
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for root in self.workdir.glob("state/**/runc"):
            if root.is_dir():
                for cid in os.listdir(root):
                    subprocess.run(["runc", "--root", str(root), "delete", "--force", cid],
                                   capture_output=True, check=False)
        unmount_under(self.workdir)
        network, bridge = network_names(self.daemon)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        shutil.rmtree(Path("/var/lib/cni/networks") / network, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- memory -----------------------------------------------------------------------------------

@dataclass
class Memory:
    """KiB summed over all pods of one runtime, by kind of process."""

    kinds: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # kind: n, PSS, RSS

    def add(self, kind: str, pid: int) -> None:
        pss, rss = pss_rss(pid)
        n, p, r = self.kinds.get(kind, (0, 0, 0))
        self.kinds[kind] = (n + 1, p + pss, r + rss)

    @property
    def pss(self) -> int:
        return sum(p for _, p, _ in self.kinds.values())

    @property
    def rss(self) -> int:
        return sum(r for _, _, r in self.kinds.values())


def criserver_memory(crid: RuncDaemon) -> Memory:
    """Every ctrmon of the daemon (one per container, one per infra container) and the infra
    processes (`ctrmon pause`, a monitor's child); the containers' own processes not."""
    table = proc_table()
    mem = Memory()
    monitors = crid.monitors()
    for pid in monitors:
        mem.add("ctrmon monitor", pid)
    for pid, (ppid, argv) in table.items():
        if ppid in monitors and argv == [a.encode() for a in INFRA_ARGV]:
            mem.add("infra (ctrmon pause)", pid)
    return mem


def containerd_memory(ctrd: Containerd) -> Memory:
    """Every containerd-shim-runc-v2 of this containerd and the sandbox (pause) processes (a
    shim's children running the pause image's command); the containers' own processes not."""
    table = proc_table()
    mem = Memory()
    shims = ctrd.shim_pids()
    for pid in shims:
        mem.add("containerd-shim-runc-v2", pid)
    for pid, (ppid, argv) in table.items():
        if ppid in shims and argv == [a.encode() for a in PAUSE_ARGV]:
            mem.add("pause (busybox sleep)", pid)
    return mem


# -- the run ----------------------------------------------------------------------------------

async def alternate(sides: list[Side], total: int, block: int,
                    step: Callable[[Side, int], Awaitable[None]], label: str) -> None:
    """`step(side, i)` for i in range(total) on every side, in blocks of `block`: A B, B A, ..."""
    done = 0
    order = list(sides)
    while done < total:
        k = min(block, total - done)
        for side in order:
            for i in range(done, done + k):
                await step(side, i)
        done += k
        order.reverse()
        print(f"  {label} {done}/{total}: " + ", ".join(
            f"{s.name} p50 " + "/".join(f"{pct(v, 0.5) * 1000:.0f}" for v in s.samples.values())
            + " ms" for s in sides), flush=True)


async def run(args: argparse.Namespace) -> None:
    reg_dir = Path(tempfile.mkdtemp(prefix="runcb-reg-", dir="/tmp"))
    logs = Path(tempfile.mkdtemp(prefix="runcb-logs-", dir="/tmp"))
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    tag = secrets.token_hex(2)
    try:
        await push_images(registry.base)
        image = f"{registry.host}/e2e/busybox:latest"
        pause = f"{registry.host}/bench/pause:latest"
        ctrd = Containerd(registry.host, pause, cni_chain=args.cni)
        with ctrd, RuncDaemon(args.ctrmon, args.cni, args.daemon_log) as crid:
            assert ctrd.process is not None
            sides = [Side("containerd", ctrd.client(), ctrd.process.pid, logs / "containerd"),
                     Side("criserver", crid.daemon.client(), crid.daemon.pid, logs / "criserver")]
            floor = Side("runc exec (floor)", sides[0].cri, 0, logs)
            try:
                await measure(args, sides, floor, ctrd, crid, image, tag)
            finally:
                for side in sides:
                    for pod in list(side.pods):
                        try:
                            await side.remove_pod(pod, timed_=False)
                        except Exception as exc:
                            print(f"  warning: {side.name} pod {pod.id}: {exc!r}", flush=True)
                    await side.remove_all()
                    await side.cri.close()
    finally:
        _stop(registry)
        shutil.rmtree(reg_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


async def measure(args: argparse.Namespace, sides: list[Side], floor: Side, ctrd: Containerd,
                  crid: RuncDaemon, image: str, tag: str) -> None:
    n = args.pods
    for side in sides:
        await side.cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)),
                                       timeout=300)
        # A first pod each, untimed: unpacking, the pause image, CNI's first run.
        for i in range(args.warmup_pods):
            pod = await side.start_pod(f"warm-{tag}-{side.name}-{i}", image, timed_=False)
            for _ in range(args.warmup):
                await side.cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=pod.cid,
                                                    cmd=["true"], timeout=30), timeout=60)
            if ns := await pod_netns(side.cri, pod.id):
                ctrd.netns_paths.add(ns)
            await side.remove_pod(pod, timed_=False)
    await asyncio.sleep(2)
    for side in sides:
        side.rss_before = rss_kib(side.daemon_pid)
    load0 = os.getloadavg()[0]

    async def start(side: Side, i: int) -> None:
        pod = await side.start_pod(f"b-{tag}-{side.name}-{i}", image)
        if side.name == "containerd" and (ns := await pod_netns(side.cri, pod.id)):
            ctrd.netns_paths.add(ns)

    await alternate(sides, n, args.block, start, "pods (RunPodSandbox/Create/Start/both)")

    calls: dict[str, tuple[Side, Callable[[], Awaitable[None]]]] = {}
    for side in sides:
        request = msg("ExecSyncRequest", container_id=side.pods[0].cid, cmd=["true"], timeout=30)

        async def call(side: Side = side, request: object = request) -> None:
            r = await side.cri.runtime.ExecSync(request, timeout=60)
            assert r.exit_code == 0, r

        calls[side.name] = (side, call)
    calls[floor.name] = (floor, runc_exec(ctrd.runc_root, sides[0].pods[0].cid))
    exec_sides = [s for s, _ in calls.values()]

    async def exec_block(side: Side, i: int) -> None:
        side.add("ExecSync `true`", (await timed(calls[side.name][1], 1))[0])

    for _, warm_up in calls.values():
        await timed(warm_up, args.warmup)
    await alternate(exec_sides, args.execs, args.exec_block, exec_block, "ExecSync")
    load1 = os.getloadavg()[0]

    print(f"  {n} pods per runtime idle for {args.idle:.0f} s", flush=True)
    await asyncio.sleep(args.idle)
    mems = {"containerd": containerd_memory(ctrd), "criserver": criserver_memory(crid)}
    growth = {s.name: rss_kib(s.daemon_pid) - s.rss_before for s in sides}

    async def remove(side: Side, i: int) -> None:
        await side.remove_pod(side.pods[0])

    await alternate(sides, n, args.block, remove, "removal")
    report(args, sides, floor, mems, growth, load0, load1)


def report(args: argparse.Namespace, sides: list[Side], floor: Side, mems: dict[str, Memory],
           growth: dict[str, int], load0: float, load1: float) -> None:
    version = subprocess.run(["containerd", "--version"], capture_output=True,
                             text=True).stdout.split()[2]
    runc_version = subprocess.run(["runc", "--version"], capture_output=True,
                                  text=True).stdout.split()[2]
    base, crs = sides
    print()
    print(f"{args.pods} pods per runtime (blocks of {args.block}, alternating), {args.execs} "
          f"ExecSync per runtime (blocks of {args.exec_block}); containerd {version} + runc "
          f"{runc_version} (overlayfs, CNI bridge) vs criserver runc handler (ctrmon). "
          f"Load average {load0:.1f} -> {load1:.1f} (during the latency phases), "
          f"{os.cpu_count()} CPUs.")
    print()
    print("| call | containerd p50 | p90 | criserver p50 | p90 | ratio p50 | ratio p90 |")
    print("|---|---|---|---|---|---|---|")
    for what in base.samples:
        b, c = base.samples[what], crs.samples[what]
        print(f"| {what} | {pct(b, 0.5) * 1000:.1f} ms | {pct(b, 0.9) * 1000:.1f} ms "
              f"| {pct(c, 0.5) * 1000:.1f} ms | {pct(c, 0.9) * 1000:.1f} ms "
              f"| {pct(c, 0.5) / pct(b, 0.5):.2f}x | {pct(c, 0.9) / pct(b, 0.9):.2f}x |")
    f = floor.samples["ExecSync `true`"]
    b = base.samples["ExecSync `true`"]
    print(f"| `runc exec true` (containerd's container, no CRI) | | | {pct(f, 0.5) * 1000:.1f} ms "
          f"| {pct(f, 0.9) * 1000:.1f} ms | {pct(f, 0.5) / pct(b, 0.5):.2f}x "
          f"| {pct(f, 0.9) / pct(b, 0.9):.2f}x |")
    print()
    print(f"Host memory per idle pod ({args.pods} pods each, one `sleep` container, "
          f"{args.idle:.0f} s idle; the container's own processes excluded)")
    print()
    print("| runtime | processes counted (count: PSS, RSS summed over all pods) | PSS per pod "
          "| RSS per pod | + daemon RSS growth / pods | ratio PSS | ratio PSS + growth |")
    print("|---|---|---|---|---|---|---|")
    n = args.pods
    ref = mems["containerd"]
    ref_total = ref.pss / n + growth["containerd"] / n
    for name in ("containerd", "criserver"):
        m = mems[name]
        parts = "; ".join(f"{k} ({cnt}): {p / 1024:.1f} MiB, {r / 1024:.1f} MiB"
                          for k, (cnt, p, r) in m.kinds.items())
        total = m.pss / n + growth[name] / n
        print(f"| {name} | {parts} | {m.pss / n / 1024:.2f} MiB | {m.rss / n / 1024:.2f} MiB "
              f"| {growth[name] / n / 1024:+.2f} MiB -> {total / 1024:.2f} MiB "
              f"| {m.pss / ref.pss:.2f}x | {total / ref_total:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pods", type=int, default=20, help="pods per runtime (all idle together)")
    ap.add_argument("--execs", type=int, default=100, help="ExecSync calls per runtime")
    ap.add_argument("--block", type=int, default=5, help="pods per block before switching")
    ap.add_argument("--exec-block", type=int, default=10, help="execs per block")
    ap.add_argument("--warmup", type=int, default=5, help="untimed execs per runtime first")
    ap.add_argument("--warmup-pods", type=int, default=1, help="untimed pods per runtime first")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds idle before measuring")
    ap.add_argument("--ctrmon", type=Path, default=None,
                    help="ctrmon binary (default: built from this checkout into the work dir)")
    ap.add_argument("--cni", choices=("plain", "builtin"), default="plain",
                    help="the CNI chain of both sides: plain (containerd_kit's bridge) or "
                         "builtin (criserver's built-in network: masquerade, hairpin, portmap)")
    ap.add_argument("--daemon-log", type=Path, default=None,
                    help="keep criserver's log (debug level) there")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("runs containers: needs root")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
