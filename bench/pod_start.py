"""RunPodSandbox latency through the real daemon (micro-VM backend) against the boot floor
(QEMU start -> first agent byte, `bench/boot_floor.py`'s method) measured in the same run.

    .venv/bin/python bench/pod_start.py [--runs 5] [--concurrent 20] [--skip-concurrent]

Prints markdown tables: sequential RunPodSandbox of booted pods (templates off) with and
without networking (the backend option `network = false` disables CNI), and of pods cloned from
a template (network on), with their ratios to the floor; N pods started at once (wall time,
per-pod latency p50/max) and QEMU PSS/RSS per idle pod. Uses the installed guest assets
(the ones the daemon boots). The host has 2 shared cores: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from boot_floor import IDLE_SECONDS, one_boot, pss_kib  # noqa: E402

from criserver.backends.microvm.backend import MicroVMOptions  # noqa: E402
from criserver.vm import assets as assets_mod  # noqa: E402
from criserver.vm.accel import read_tsc_khz  # noqa: E402
from criserver.vm.qemu import Machine  # noqa: E402
from tests.cri_client import CRIClient, msg  # noqa: E402
from tests.daemon import Daemon, built_templates  # noqa: E402
from tests.e2e.conftest import kill_vms_under, vm_pids_of  # noqa: E402

DEFAULTS = MicroVMOptions()


def _toml(value: int | bool | str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def daemon_config(workdir: Path, tag: str, network: bool, boot_timeout: float,
                  options: Mapping[str, int | bool | str] | None = None) -> str:
    """The micro-VM handler on a private CNI network (as tests/e2e does): never the host's.
    `options`: more microvm backend options (numbers, booleans, strings). No warm pool unless
    `options` asks: a bench that times a clone or a boot wants its pods to be clones or boots,
    not pooled VMs."""
    options = {"warm_pool": 0, **(options or {})}
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24"
    extra = "".join(f", {k} = {_toml(v)}" for k, v in options.items())
    return (
        "[runtime]\ndefault_handler = \"microvm\"\n"
        "[network]\n"
        f'cni_conf_dir = "{workdir}/net.d"\n'
        f'default_network_name = "crb-{tag}"\n'
        f'default_bridge = "crb{tag}"\n'
        f'default_subnet = "{subnet}"\n'
        "[runtimes.microvm]\n"
        'backend = "microvm"\n'
        f"options = {{ network = {'true' if network else 'false'}, "
        f"boot_timeout = {boot_timeout}{extra} }}\n"
    )


class BenchDaemon:
    """A daemon in its own short work dir; `close` kills it and every QEMU it started."""

    def __init__(self, network: bool, boot_timeout: float = 60.0,
                 options: Mapping[str, int | bool | str] | None = None,
                 daemon_keys: str = "") -> None:
        """`daemon_keys`: more lines of the [daemon] table (e.g. "trace = true\n")."""
        self.workdir = Path(tempfile.mkdtemp(prefix="crb-", dir="/tmp"))
        self.tag = secrets.token_hex(3)
        self.daemon = Daemon(self.workdir, config=daemon_keys + daemon_config(
            self.workdir, self.tag, network, boot_timeout, options))

    def __enter__(self) -> BenchDaemon:
        self.daemon.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.kill()
        kill_vms_under(self.workdir)
        # The daemon's bind mounts (netns, volumes) outlive it, and CNI's bridge plugin never
        # deletes its bridge: both would leak from every run.
        prefix = f"{self.workdir}/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", f"crb{self.tag}"], check=False, capture_output=True)
        # host-local's allocations of the private network (its pods are gone).
        shutil.rmtree(f"/var/lib/cni/networks/crb-{self.tag}", ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


async def run_pod(cri: CRIClient, name: str) -> tuple[str, float]:
    t0 = time.monotonic()
    pod_id = await cri.run_pod(name, hostname=name)
    return pod_id, time.monotonic() - t0


async def remove_pod(cri: CRIClient, pod_id: str) -> None:
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))


async def wait_pool(cri: CRIClient, size: int, max_wait: float = 180.0) -> None:
    """Until the microvm backend's warm pool has `size` VMs ready (Status, verbose)."""
    deadline = time.monotonic() + max_wait
    while size:
        status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
        if json.loads(status.info["runtime.microvm"])["warmPool"]["ready"] >= size:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool did not refill in {max_wait} s")
        await asyncio.sleep(0.2)


async def build_template(cri: CRIClient, workdir: Path) -> None:
    """A first pod boots; the daemon then builds the template the next pods are cloned from.
    The pod is removed again."""
    t0 = time.monotonic()
    pod_id, _ = await run_pod(cri, "bench-template")
    while not built_templates(workdir / "state"):
        if time.monotonic() - t0 > 300:
            raise RuntimeError("no template built within 300 s")
        await asyncio.sleep(0.5)
    print(f"  template ready {time.monotonic() - t0:.0f} s after the first pod was asked for",
          flush=True)
    await remove_pod(cri, pod_id)


async def sequential(
    runs: int, a: assets_mod.GuestAssets, tsc: int | None
) -> dict[str, list[float]]:
    """Floor, booted pod with network and without, cloned pod: round-robin so host load drifts
    hit all of them."""
    out: dict[str, list[float]] = {"floor": [], "net": [], "nonet": [], "clone": []}
    booted: dict[str, int | bool] = {"templates": False}
    with BenchDaemon(network=True, options=booted) as net_d, \
            BenchDaemon(network=False, options=booted) as nonet_d, \
            BenchDaemon(network=True) as clone_d:
        clients = {"net": net_d.daemon.client(), "nonet": nonet_d.daemon.client(),
                   "clone": clone_d.daemon.client()}
        try:
            await build_template(clients["clone"], clone_d.workdir)
            for i in range(runs):
                # The same VM as the daemon's pods get (translation cache, page reporting).
                floor = await one_boot(
                    a, Machine.MICROVM, tsc, measure_pss=False,
                    tcg_tb_size_mib=DEFAULTS.tcg_tb_size_mib,
                    free_page_reporting=DEFAULTS.free_page_reporting)
                out["floor"].append(float(floor["first_byte"] or 0.0))
                for kind, cri in clients.items():
                    pod_id, took = await run_pod(cri, f"bench-{kind}-{i}")
                    out[kind].append(took)
                    await remove_pod(cri, pod_id)
                print(f"  run {i + 1}: floor {out['floor'][-1]:.2f} s, "
                      f"pod+net {out['net'][-1]:.2f} s, pod {out['nonet'][-1]:.2f} s, "
                      f"clone+net {out['clone'][-1]:.2f} s", flush=True)
        finally:
            for cri in clients.values():
                await cri.close()
    return out


async def concurrent(n: int) -> dict[str, object]:
    """n pods at once (with network): wall time, per-pod latency, idle QEMU PSS per pod."""
    # n TCG guests share 2 cores: each boots n/2 times slower, so give them time.
    with BenchDaemon(network=True, boot_timeout=max(60.0, 15.0 * n)) as bd:
        cri = bd.daemon.client()
        try:
            await build_template(cri, bd.workdir)
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(run_pod(cri, f"bench-c{i}") for i in range(n)), return_exceptions=True)
            wall = time.monotonic() - t0
            ok = [r for r in results if not isinstance(r, BaseException)]
            failed = [r for r in results if isinstance(r, BaseException)]
            for err in failed[:3]:
                print(f"  pod start failed: {err!r}", flush=True)
            await asyncio.sleep(IDLE_SECONDS)
            pss, rss = [], []
            for pod_id, _ in ok:
                for pid in vm_pids_of(pod_id):
                    p, r = pss_kib(pid)
                    pss.append(p / 1024)
                    rss.append(r / 1024)
            await asyncio.gather(*(remove_pod(cri, pod_id) for pod_id, _ in ok),
                                 return_exceptions=True)
        finally:
            await cri.close()
    return {"wall": wall, "lat": sorted(t for _, t in ok), "failed": len(failed),
            "pss": pss, "rss": rss}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--skip-concurrent", action="store_true")
    args = ap.parse_args()
    a = assets_mod.load()
    tsc = read_tsc_khz()
    print(f"assets {a.path.name[:12]}: kernel {a.kernel_release}, pyc {a.manifest.get('pyc_mode')}",
          flush=True)
    seq = await sequential(args.runs, a, tsc)
    floor = statistics.median(seq["floor"])
    print()
    print(f"RunPodSandbox vs floor, {args.runs} runs each, interleaved, microvm, TCG")
    print()
    print("| what | median | min | max | / floor (median) |")
    print("|---|---|---|---|---|")
    for kind, label in (("floor", "floor: QEMU start -> first agent byte"),
                        ("net", "RunPodSandbox, booted, network on (CNI)"),
                        ("nonet", "RunPodSandbox, booted, network = false"),
                        ("clone", "RunPodSandbox, cloned from a template, network on")):
        v = seq[kind]
        print(f"| {label} | {statistics.median(v):.2f} s | {min(v):.2f} s | {max(v):.2f} s "
              f"| {statistics.median(v) / floor:.2f}x |")
    if args.skip_concurrent:
        return
    c = await concurrent(args.concurrent)
    lat = c["lat"]
    pss, rss = c["pss"], c["rss"]
    assert isinstance(lat, list) and isinstance(pss, list) and isinstance(rss, list)
    print()
    print(f"{args.concurrent} pods started concurrently (network on), "
          f"then {IDLE_SECONDS:.0f} s idle")
    print()
    print("| wall (all started) | per-pod p50 | per-pod max | failed | QEMU PSS per pod (median) "
          "| PSS total | QEMU RSS per pod (median) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {c['wall']:.1f} s | {pct(lat, 0.5) if lat else 0:.1f} s "
          f"| {max(lat) if lat else 0:.1f} s | {c['failed']} "
          f"| {statistics.median(pss) if pss else 0:.0f} MiB | {sum(pss):.0f} MiB "
          f"| {statistics.median(rss) if rss else 0:.0f} MiB |")


if __name__ == "__main__":
    asyncio.run(main())
