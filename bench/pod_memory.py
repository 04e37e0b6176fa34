"""Host memory per idle pod: N pods started at once through the CRI socket, each running an idle
busybox container (image from a local docker-registry), then the PSS of each pod's QEMU (the
only per-pod process on the host) split into guest RAM, TCG translation cache, the mapped
kernel and the rest.

    .venv/bin/python -m bench.pod_memory [--pods 20] [--idle 30] [--no-baseline] [--no-ksm]

Measured in one run: a baseline daemon with QEMU's own defaults (translation cache up to 1 GiB,
no free page reporting, every pod booted), then criserver's defaults with templates off (every
pod booted), then criserver's defaults (pods cloned from a template, built by a first pod that
is removed before the N start), then the same pods again once the host's KSM has merged
identical pages (KSM is restored to its previous settings). With templates, each pod is also
charged 1/N of the template file's pages that no pod maps (those it maps are in its PSS).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.exec_baseline import push_images
from bench.pod_start import BenchDaemon, build_template
from tests.cri_client import CRIClient, msg
from tests.e2e.conftest import vm_pids_of
from tests.registry import _start_registry, _stop

KSM = Path("/sys/kernel/mm/ksm")
MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass
class Usage:
    """MiB of one QEMU by kind of mapping."""

    pss: dict[str, float] = field(default_factory=dict)
    rss: float = 0.0
    template_file_pss: float = 0.0  # the template's own pages in that (not copied-on-write)

    @property
    def total(self) -> float:
        return sum(self.pss.values())


def usage(pid: int, guest_mib: int) -> Usage:
    """Guest RAM is the anonymous mapping of the guest's size; the translation cache is QEMU's
    executable anonymous mapping; the kernel is the mapped vmlinux file."""
    out = Usage()
    kind = "other"
    template = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = MAPPING.match(line)
        if m:
            size_mib = (int(m[2], 16) - int(m[1], 16)) >> 20
            template = m[4].endswith("/memory") and "/templates/" in m[4]
            if template:
                kind = "guest RAM"  # a clone's: the template's file, mapped privately
            elif "vmlinux" in m[4]:
                kind = "kernel"
            elif m[3].startswith("rwx"):
                kind = "tcg"
            elif not m[4] and size_mib == guest_mib:
                kind = "guest RAM"
            else:
                kind = "other"
        elif line.startswith("Pss:"):
            out.pss[kind] = out.pss.get(kind, 0.0) + int(line.split()[1]) / 1024
            if template:
                out.template_file_pss += int(line.split()[1]) / 1024
        elif template and line.startswith("Anonymous:"):
            out.template_file_pss -= int(line.split()[1]) / 1024
        elif line.startswith("Rss:"):
            out.rss += int(line.split()[1]) / 1024
    return out


def report(label: str, usages: list[Usage], base: float | None) -> float:
    per_pod = statistics.mean(u.total for u in usages)
    kinds = sorted({k for u in usages for k in u.pss})
    parts = ", ".join(f"{k} {statistics.mean(u.pss.get(k, 0.0) for u in usages):.0f}"
                      for k in kinds)
    ratio = f"{per_pod / base:.2f}x" if base else "1.00x"
    print(f"| {label} | {len(usages)} | {per_pod:.0f} MiB | "
          f"{statistics.mean(u.rss for u in usages):.0f} MiB | {parts} | {ratio} |", flush=True)
    return per_pod


async def start_pods(cri: CRIClient, image: str, n: int) -> list[str]:
    async def one(i: int) -> str:
        pod_id = await cri.run_pod(f"mem-{i}", hostname=f"mem-{i}")
        cid = await cri.create_container(pod_id, "idle", pod_name=f"mem-{i}", image=image,
                                         command=["sleep", "100000"])
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid),
                                         timeout=600)
        return pod_id

    await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)),
                              timeout=300)
    t0 = time.monotonic()
    pods = await asyncio.gather(*(one(i) for i in range(n)))
    print(f"  {n} pods with a container each up in {time.monotonic() - t0:.0f} s", flush=True)
    return list(pods)


def measure(pods: list[str], guest_mib: int, workdir: Path | None = None) -> list[Usage]:
    usages = [usage(pid, guest_mib) for pod in pods for pid in vm_pids_of(pod)]
    if workdir is not None:
        # The template's pages no clone maps are in no PSS: shared out among the pods.
        files = list(workdir.glob("state/runtimes/*/templates/*/memory"))
        resident = sum(f.stat().st_blocks * 512 for f in files) / 2**20
        unmapped = max(0.0, resident - sum(u.template_file_pss for u in usages))
        for u in usages:
            if resident:
                u.pss["template unmapped 1/N"] = unmapped / len(usages)
        print(f"  template memory file: {resident:.0f} MiB resident, {unmapped:.0f} MiB of it "
              "mapped by no pod", flush=True)
    return usages


def _ksm_read(name: str) -> int:
    return int((KSM / name).read_text())


async def with_ksm(pods: list[str], guest_mib: int, wait: float) -> tuple[list[Usage], str]:
    """Turn KSM on (scanning fast), wait until sharing stops growing, measure, restore."""
    saved = {n: (KSM / n).read_text() for n in ("run", "pages_to_scan", "sleep_millisecs")}
    try:
        (KSM / "pages_to_scan").write_text("5000")
        (KSM / "sleep_millisecs").write_text("20")
        (KSM / "run").write_text("1")
        t0 = time.monotonic()
        last, stable = -1, 0
        while time.monotonic() - t0 < wait and stable < 3:
            await asyncio.sleep(5)
            sharing = _ksm_read("pages_sharing")
            stable = stable + 1 if sharing <= last * 1.01 else 0
            last = max(last, sharing)
        note = (f"KSM converged in {time.monotonic() - t0:.0f} s, pages_sharing {last}, "
                f"full scans {_ksm_read('full_scans')}")
        return measure(pods, guest_mib), note
    finally:
        if saved["run"].strip() != "1":
            (KSM / "run").write_text("2")  # unmerge what we merged
        for name, value in saved.items():
            (KSM / name).write_text(value)


async def batch(label: str, image: str, n: int, idle: float, options: dict[str, int | bool],
                base: float | None, ksm_wait: float) -> float:
    guest_mib = 256 + 64  # default_memory_mib + memory_overhead_mib
    templates = options.get("templates", True)
    with BenchDaemon(network=True, boot_timeout=max(60.0, 15.0 * n), options=options) as bd:
        cri = bd.daemon.client()
        workdir = bd.workdir if templates else None
        try:
            if workdir is not None:
                await build_template(cri, workdir)
            pods = await start_pods(cri, image, n)
            await asyncio.sleep(idle)
            before = measure(pods, guest_mib, workdir)
            per_pod = report(label, before, base)
            if ksm_wait > 0:
                usages, note = await with_ksm(pods, guest_mib, ksm_wait)
                # KSM's merged pages blur a clone's file and copied pages in smaps: the
                # template's unmapped share is the one measured before.
                for u in usages:
                    u.pss.update({k: v for k, v in before[0].pss.items() if "template" in k})
                report(label + " + host KSM", usages, base)
                print(f"  {note}", flush=True)
        finally:
            await cri.close()
    return per_pod


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds idle before measuring")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-ksm", action="store_true")
    ap.add_argument("--ksm-wait", type=float, default=300.0)
    ap.add_argument("--tb-size", type=int, default=None,
                    help="tcg_tb_size_mib for the criserver batch (default: the backend's)")
    args = ap.parse_args()
    reg_dir = Path(tempfile.mkdtemp(prefix="podmem-reg-", dir="/tmp"))
    registry = _start_registry(reg_dir / "open", htpasswd=False)
    try:
        await push_images(registry.base)
        image = f"{registry.host}/e2e/busybox:latest"
        print("| configuration | pods | PSS per pod | RSS per pod | PSS split (MiB) | "
              "vs baseline |\n|---|---|---|---|---|---|", flush=True)
        base = None
        if not args.no_baseline:
            base = await batch("QEMU defaults (no tb-size, no page reporting, booted)", image,
                               args.pods, args.idle, {"tcg_tb_size_mib": 0, "templates": False,
                                                      "free_page_reporting": False}, None, 0)
            await batch("criserver defaults, templates off (booted)", image, args.pods,
                        args.idle, {"templates": False}, base, 0)
        options: dict[str, int | bool] = {}
        if args.tb_size is not None:
            options["tcg_tb_size_mib"] = args.tb_size
        label = "criserver defaults" + (f" (tb-size {args.tb_size})" if options else "")
        await batch(label, image, args.pods, args.idle, options, base,
                    0 if args.no_ksm else args.ksm_wait)
    finally:
        _stop(registry)
        shutil.rmtree(reg_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
