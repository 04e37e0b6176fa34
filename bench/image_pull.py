"""Benchmark: pull a ~200 MB, 5-layer image from a local docker-registry with criserver's
ImageService, against `skopeo copy docker://... oci:DIR` in the same run.

Reports wall time and peak RSS of each (each runs as its own child process, peak RSS from
wait4), as a markdown table. criserver is measured twice: download + verify only (what skopeo
does), and the full pull (plus unpack and the EROFS snapshot).

    .venv/bin/python bench/image_pull.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1024 * 1024

if TYPE_CHECKING:
    from tests.image.oci import Image


def build_image() -> Image:
    from tests.image.oci import E, Image, Layer, tar_bytes

    rng = random.Random(42)
    words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(5000)]

    def text(size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            out += b" ".join(rng.choices(words, k=64)) + b"\n"
        return bytes(out[:size])

    layers = []
    for i in range(3):  # incompressible: 3 x 45 MiB in 9 files each
        files = [E(f"data{i}/blob{j}", data=os.urandom(5 * MiB)) for j in range(9)]
        layers.append(Layer(tar_bytes(files), "gzip"))
    for i in range(2):  # compressible: 2 x 32 MiB of text-like files, many small files
        files = [E(f"text{i}/f{j:04d}.txt", data=text(64 * 1024)) for j in range(512)]
        layers.append(Layer(tar_bytes(files), "gzip"))
    return Image(layers, config={"Cmd": ["/bin/true"]})


async def push(base: str, image: Image) -> None:
    import aiohttp

    from tests.image.oci import Pusher

    async with aiohttp.ClientSession() as session:
        await Pusher(session, base).image("bench/big", "v1", image)


def start_registry(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A docker-registry on a free loopback port (kept import-light: see run_child)."""
    import socket
    import urllib.request

    workdir.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"
    (workdir / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        f"http:\n  addr: {host}\n"
    )
    proc = subprocess.Popen(["docker-registry", "serve", str(workdir / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1).close()
            return proc, host
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def run_child(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, stderr) of one child process. Linux carries the
    parent's peak RSS into a child's (vfork + exec), so the parent stays small: the image is
    built and pushed by a child of its own."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{argv[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    assert proc.stderr is not None
    return wall, usage.ru_maxrss, proc.stderr.read().decode()


async def child_pull(ref: str, root: Path, full: bool) -> None:
    """Runs in the child: one pull into a fresh root."""
    from criserver.config import ImageConfig
    from criserver.image import ImageService
    from criserver.image.reference import parse
    from criserver.store.db import Database

    db = await Database.open(root / "db.sqlite")
    service = ImageService(ImageConfig(), root, db)
    await service.start()
    started = time.monotonic()
    if full:
        await service.pull(ref)
    else:
        await service.puller.fetch(parse(ref), None)
    print(f"in-process seconds {time.monotonic() - started:.2f}", file=sys.stderr)
    await service.close()
    await db.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=["fetch", "full", "push"])
    parser.add_argument("--ref")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child == "push":
        image = build_image()
        asyncio.run(push(args.ref, image))
        total = sum(len(x.blob) for x in image.layers)
        unpacked = sum(len(x.tar) for x in image.layers)
        print(f"{total} {unpacked}", file=sys.stderr)
        return
    if args.child:
        import uvloop

        uvloop.run(child_pull(args.ref, Path(args.root), args.child == "full"))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    registry, host = start_registry(work / "registry")
    try:
        t = time.monotonic()
        _, _, sizes = run_child([sys.executable, __file__, "--child", "push", "--ref",
                                 f"http://{host}", "--root", "-"])
        total, unpacked = map(int, sizes.split())
        print(f"image: 5 layers, {total / MiB:.0f} MiB compressed, {unpacked / MiB:.0f} MiB "
              f"uncompressed (built and pushed in {time.monotonic() - t:.1f} s)\n")
        ref = f"{host}/bench/big:v1"
        results: dict[str, list[tuple[float, int, str]]] = {"skopeo": [], "fetch": [],
                                                            "full": []}
        for run in range(args.runs):
            for kind in results:
                dest = work / f"{kind}-{run}"
                if kind == "skopeo":
                    argv = ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{ref}", f"oci:{dest}:v1"]
                else:
                    dest.mkdir()
                    argv = [sys.executable, __file__, "--child", kind, "--ref", ref,
                            "--root", str(dest)]
                results[kind].append(run_child(argv))
                shutil.rmtree(dest, ignore_errors=True)
        names = {"skopeo": "skopeo copy docker:// -> oci: (download + verify)",
                 "fetch": "criserver pull, download + verify only",
                 "full": "criserver pull + unpack + EROFS snapshot"}
        print(f"| what | process wall s (median of {args.runs}) | min | pull s in process "
              "(median) | peak RSS MiB (max) |")
        print("|---|---|---|---|---|")
        for kind, rows in results.items():
            walls = [w for w, _, _ in rows]
            inner = [float(e.split("in-process seconds")[1].split()[0]) for _, _, e in rows
                     if "in-process seconds" in e]
            inner_text = f"{statistics.median(inner):.2f}" if inner else "-"
            print(f"| {names[kind]} | {statistics.median(walls):.2f} | {min(walls):.2f} | "
                  f"{inner_text} | {max(r for _, r, _ in rows) / 1024:.0f} |")
        import resource

        print(f"\n(bench parent peak RSS, a floor for every child's: "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    finally:
        registry.terminate()
        registry.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
