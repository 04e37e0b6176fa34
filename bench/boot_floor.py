"""The floor under RunPodSandbox: wall time from QEMU start to the first byte from the guest
agent on its channel, per machine type and kernel flavour, plus QEMU's PSS with an idle guest.

    .venv/bin/python bench/boot_floor.py [--runs 5] [--machines microvm,q35]
                                         [--flavours amd64,cloud] [--assets-root DIR]

Builds (or reuses) one asset set per kernel flavour under --assets-root, runs the VMs one at a
time (the hosts have 2 shared cores) and prints a markdown table. Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from criserver.backends.microvm.guest import GuestBoot, pod_guest_spec  # noqa: E402
from criserver.vm import assets as assets_mod  # noqa: E402
from criserver.vm.accel import PROBE_MARKER, read_tsc_khz  # noqa: E402
from criserver.vm.qemu import Machine, SerialTransport  # noqa: E402
from criserver.vm.vm import VM  # noqa: E402
from guest import build as guestbuild  # noqa: E402

# What the daemon's HTTP/2 client sends first; the agent answers with its SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
IDLE_SECONDS = 5.0  # let the guest settle before reading PSS


async def first_byte(sock: Path, max_wait: float) -> float:
    """Connect as soon as the socket exists; return when the first guest byte arrives."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(H2_PREFACE)
        await writer.drain()
        async with asyncio.timeout(max_wait):
            data = await reader.read(1)
        if not data:
            raise RuntimeError("agent channel closed before the first byte")
        return time.monotonic()
    finally:
        writer.close()


def pss_kib(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    rss = int(re.search(r"^Rss:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]
    pss = int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]
    return pss, rss


def cpu_seconds(pid: int) -> float:
    """utime + stime of QEMU: steadier than wall time on a shared, noisy host."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serving_uptime(log: Path) -> float | None:
    return guest_marks(log).get("serving")


def guest_marks(log: Path) -> dict[str, float]:
    """Boot-relative seconds from the console: /init reached, agent exec'd/started/serving."""
    text = log.read_text(errors="replace")
    marks: dict[str, float] = {}
    for key, pattern in (("init", r"criserver-init: starting agent .* init=([\d.]+)"),
                         ("exec", r"criserver-init: starting agent .* exec=([\d.]+)"),
                         ("started", r"started_uptime=([\d.]+)"),
                         ("serving", r"serving_uptime=([\d.]+)")):
        m = re.search(pattern, text)
        if m:
            marks[key] = float(m.group(1))
    return marks


async def one_boot(
    a: assets_mod.GuestAssets, machine: Machine, tsc: int | None, measure_pss: bool,
    **vm_options: Any,
) -> dict[str, float | None]:
    """`vm_options`: more pod_guest_spec options (e.g. the backend's host-memory settings)."""
    d = Path(tempfile.mkdtemp(prefix="cribench-", dir="/tmp"))
    spec = pod_guest_spec(f"bench-{d.name}", d, a, SerialTransport(d / "agent.sock"),
                          GuestBoot(tsc_khz=tsc), machine=machine, **vm_options)
    vm = VM(spec)
    try:
        t0 = time.monotonic()
        await vm.start()
        t_started = time.monotonic()
        t_first = await first_byte(d / "agent.sock", 120.0)
        out: dict[str, float | None] = {
            "first_byte": t_first - t0,
            "qemu_cpu": cpu_seconds(vm.pid) if vm.pid is not None else None,
            "qemu_up": t_started - t0,
        }
        marks = guest_marks(spec.log_file)
        out.update({f"guest_{k}": marks.get(k) for k in ("init", "exec", "started")})
        out["agent_serving_uptime"] = marks.get("serving")
        if measure_pss and vm.pid is not None:
            await asyncio.sleep(IDLE_SECONDS)
            pss, rss = pss_kib(vm.pid)
            out["pss_mib"], out["rss_mib"] = pss / 1024, rss / 1024
        return out
    finally:
        await vm.kill()
        shutil.rmtree(d, ignore_errors=True)


async def kernel_to_init(a: assets_mod.GuestAssets, machine: Machine, tsc: int | None) -> float:
    """Wall time from QEMU start to /init's probe marker: the kernel's share of the floor."""
    cmdline = f"console=ttyS0 quiet cryptomgr.notests criserver.probe=1 tsc_early_khz={tsc}"
    mach = "microvm,acpi=on" if machine is Machine.MICROVM else "q35"
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-machine", mach, "-accel", "tcg", "-m", "256", "-nodefaults",
        "-no-user-config", "-nographic", "-no-reboot", "-kernel", str(a.kernel),
        "-initrd", str(a.initramfs), "-append", cmdline, "-serial", "stdio",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(60):
            while PROBE_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    raise RuntimeError("QEMU exited before the /init marker")
                seen += chunk
        return time.monotonic() - t0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def fmt(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else (f"{v:.2f} {unit}" if unit == "s" else f"{v:.0f} {unit}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--machines", default="microvm,q35")
    ap.add_argument("--flavours", default="amd64,cloud")
    ap.add_argument("--assets-root", type=Path, default=Path("/var/tmp/criserver-bench-guest"))
    args = ap.parse_args()
    tsc = read_tsc_khz()
    built: dict[str, assets_mod.GuestAssets] = {}
    for flavour in args.flavours.split(","):
        t = time.monotonic()
        cfg = guestbuild.BuildConfig(assets_dir=args.assets_root / flavour, flavour=flavour)
        path = await asyncio.to_thread(guestbuild.build, cfg)
        a = built[flavour] = assets_mod.load(path.parent)
        sizes = {n: m["size"] / 2**20 for n, m in a.manifest["files"].items()}
        print(
            f"assets {flavour}: kernel {a.kernel_release}, agent={a.manifest['agent']}, "
            f"build {a.manifest.get('build_seconds')} s (this call {time.monotonic() - t:.1f} s), "
            + ", ".join(f"{n} {s:.1f} MiB" for n, s in sorted(sizes.items())),
            flush=True,
        )
    combos = [(f, Machine(m)) for f in built for m in args.machines.split(",")]
    results: dict[tuple[str, Machine], list[dict[str, float | None]]] = {c: [] for c in combos}
    kernel_times: dict[tuple[str, Machine], list[float]] = {c: [] for c in combos}
    # Round-robin over the combinations: load from other work drifts over minutes, and
    # interleaving spreads it evenly instead of penalising whichever combination ran last.
    for i in range(args.runs):
        for flavour, machine in combos:
            a = built[flavour]
            kernel_times[flavour, machine].append(await kernel_to_init(a, machine, tsc))
            r = await one_boot(a, machine, tsc, measure_pss=(i == 0))
            print(f"  {flavour}/{machine} run {i + 1}: {r}", flush=True)
            results[flavour, machine].append(r)
    rows: list[tuple[str, str, list[float | None]]] = []
    for (flavour, machine), res in results.items():
        first = [v for r in res if (v := r["first_byte"]) is not None]
        up = [v for r in res if (v := r["agent_serving_uptime"]) is not None]
        marks = {k: [v for r in res if (v := r.get(f"guest_{k}")) is not None]
                 for k in ("init", "exec", "started")}
        cpu = [v for r in res if (v := r["qemu_cpu"]) is not None]
        rows.append(
            (
                flavour,
                str(machine),
                [
                    statistics.median(kernel_times[flavour, machine]),
                    statistics.median(first),
                    min(first),
                    max(first),
                    *(statistics.median(v) if v else None for v in marks.values()),
                    statistics.median(up) if up else None,
                    statistics.median(cpu) if cpu else None,
                    res[0].get("pss_mib"),
                    res[0].get("rss_mib"),
                ],
            )
        )
    print()
    print(f"QEMU start -> first agent byte, {args.runs} runs each, TCG, tsc_early_khz={tsc}")
    print()
    print(
        "| kernel | machine | QEMU start to /init | first byte: median | min | max "
        "| guest uptime: /init | agent exec | agent started | agent serving "
        "| QEMU CPU to first byte | QEMU PSS idle | QEMU RSS idle |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fl, m, (k, med, lo, hi, g_init, g_exec, g_start, up_s, cpu_s, pss, rss) in rows:
        print(
            f"| {fl} | {m} | {fmt(k)} | {fmt(med)} | {fmt(lo)} | {fmt(hi)} | {fmt(g_init)} "
            f"| {fmt(g_exec)} | {fmt(g_start)} | {fmt(up_s)} "
            f"| {fmt(cpu_s)} | {fmt(pss, 'MiB')} | {fmt(rss, 'MiB')} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
