"""IRI machines through the real daemon against the same VM started directly on the VM layer, in
one run (issue 17's bench).

    .venv/bin/python bench/machines.py [--runs 3] [--idle 10]

Baseline ("direct"): the tests' IronCore OS image (tests/machine/os_image.py) booted as
criserver's driver would boot it (q35, its kernel and initramfs, a copy-on-write root disk over
its base, a tap NIC, an interactive console), started with `VM.start()` in this process: no
gRPC, no store, no reconciler, no pull. Machine: CreateMachine of the same image (pulled once,
before timing, from a local docker-registry) through the daemon's MachineRuntime socket.

Measured per run, alternating direct/machine:
- start -> RUNNING: CreateMachine returns -> status RUNNING (machine) / VM.start() returns (direct);
- start -> console: -> the test OS's first console line (`IRI-TEST-OS READY`) in the console log;
- disk hotplug: AttachVolume -> the guest sees the disk (machine) / VM.add_disk -> the guest sees
  it (direct), both read on the console;
- memory: QEMU PSS and RSS after `--idle` seconds idle.
Prints a markdown table; ratios are machine / direct. The host has 2 shared cores (TCG): compare
ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from boot_floor import pss_kib  # noqa: E402

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri  # noqa: E402
from criserver.machine import network  # noqa: E402
from criserver.machine.driver import VM_DIR_ID_CHARS  # noqa: E402
from criserver.vm import disks  # noqa: E402
from criserver.vm.qemu import (  # noqa: E402
    DirectKernel,
    Disk,
    Machine,
    RebootPolicy,
    TapNic,
    VMSpec,
)
from criserver.vm.vm import VM  # noqa: E402
from tests.daemon import INERT_CONFIG, Daemon  # noqa: E402
from tests.machine import os_image  # noqa: E402
from tests.machine.client import MachineClient  # noqa: E402
from tests.machine.console import V5, Console, wait_for_log  # noqa: E402
from tests.machine.test_daemon_machines import wait_for  # noqa: E402
from tests.registry import _start_registry, _stop  # noqa: E402

MiB = 1 << 20
MEMORY = 256 * MiB
ROOT = 64 * MiB
DATA = 16 * MiB
POLL = 0.02  # seconds between looks at the machine's status and the guest's /sys/block


def since(start: float) -> float:
    return time.monotonic() - start


async def direct_run(work: Path, files: os_image.OsImageFiles, idle: float) -> dict[str, float]:
    """The baseline: the VM the driver would make, started here."""
    base = await disks.Bases(work / "bases").ensure("bench", files.disk)
    root = await disks.create(work / "root.qcow2", ROOT, base)
    data = await disks.create(work / "data.qcow2", DATA)
    tap_name = await network.plug("bench-direct", "eth0", "bench-net")
    fd = await network.open_tap(tap_name)
    vm_dir = work / "vm"
    spec = VMSpec(
        vm_id="bench-direct", state_dir=vm_dir, machine=Machine.Q35, accel="tcg",
        boot=DirectKernel(files.kernel, files.initramfs,
                          f"{os_image.COMMAND_LINE} hostname=bench"),
        reboot=RebootPolicy.RESET, vcpus=1, memory_mib=MEMORY // MiB,
        disks=(Disk("vol-oda", root.path, serial="oda", read_only=False, format="qcow2"),),
        nics=(TapNic(fd, network.mac_address("bench-direct", "eth0"), id="nic-eth0"),),
        hotplug_slots=30, unpluggable_devices=True, interactive_console=True)
    vm = VM(spec)
    result: dict[str, float] = {}
    try:
        start = time.monotonic()
        await vm.start()
        result["running"] = since(start)
        await wait_for_log(spec.location.log_file, os_image.MARKER, 180)
        result["console"] = since(start)
        reader, writer = await asyncio.open_unix_connection(str(spec.console_socket))
        console = Console.unix(reader, writer)
        start = time.monotonic()
        await vm.add_disk(Disk("vol-odb", data.path, serial="odb", read_only=False,
                               format="qcow2"))
        await console.until("cat /sys/block/vdb/size", str(DATA // 512), 60, POLL)
        result["hotplug"] = since(start)
        writer.close()
        await asyncio.sleep(idle)
        assert vm.pid is not None
        result["pss"], result["rss"] = pss_kib(vm.pid)
    finally:
        os.close(fd)
        await vm.kill()
        await network.unplug("bench-direct", "eth0", "bench-net")
    return result


async def machine_run(client: MachineClient, image: str, state: Path, idle: float
                      ) -> dict[str, float]:
    machine = iri.Machine()
    setattr(machine.spec, "class", "bench")
    machine.spec.power = iri.POWER_ON
    machine.spec.guest_config.hostname = "bench"
    root = machine.spec.volumes.add(name="root", device="oda")
    root.local_disk.size_bytes = ROOT
    root.local_disk.image.image = image
    machine.spec.network_interfaces.add(name="eth0", network_id="bench-net")
    result: dict[str, float] = {}
    start = time.monotonic()
    created = await client.call("CreateMachine", iri.CreateMachineRequest(machine=machine))
    m = created.machine.metadata.id
    vm_dir = state / m[:VM_DIR_ID_CHARS]
    try:
        await client.wait_settled(m, iri.MACHINE_RUNNING, timeout=180, interval=POLL)
        result["running"] = since(start)
        await wait_for_log(vm_dir / "vm.log", os_image.MARKER, 180)
        result["console"] = since(start)
        async with aiohttp.ClientSession() as http:
            url = (await client.call("Exec", iri.ExecRequest(machine_id=m))).url
            async with http.ws_connect(url, protocols=[V5]) as ws:
                console = Console.websocket(ws)
                data = iri.Volume(name="data", device="odb",
                                  local_disk=iri.LocalDisk(size_bytes=DATA))
                start = time.monotonic()
                await client.call("AttachVolume", iri.AttachVolumeRequest(machine_id=m,
                                                                          volume=data))
                await console.until("cat /sys/block/vdb/size", str(DATA // 512), 60, POLL)
                result["hotplug"] = since(start)
        await asyncio.sleep(idle)
        pid = int((vm_dir / "qemu.pid").read_text())
        result["pss"], result["rss"] = pss_kib(pid)
    finally:
        await client.call("DeleteMachine", iri.DeleteMachineRequest(machine_id=m))
        await client.wait(m, lambda found: found is None, "gone", timeout=120)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    files = os_image.build()
    with tempfile.TemporaryDirectory(prefix="crbm-", dir="/tmp") as tmp:
        work = Path(tmp)
        registry = _start_registry(work / "registry", htpasswd=False)
        state = work / "s"
        sock = work / "iri.sock"
        daemon = Daemon(work, INERT_CONFIG + (
            f'[machine]\nenabled = true\nlisten = "unix://{sock}"\nstate = "{state}"\n'
            'accelerator = "tcg"\ndelete_grace_seconds = 5\n'
            f'classes = [{{name = "bench", cpu = 1, memory_bytes = {MEMORY}}}]\n'))
        client: MachineClient | None = None
        try:
            async with aiohttp.ClientSession() as http:
                await os_image.push(http, registry.base, "bench/os", "v1", files)
            image = f"{registry.host}/bench/os:v1"
            daemon.start()
            wait_for(sock, daemon)
            client = MachineClient(sock)
            # Untimed: pull the image, make its base, warm the page cache on both paths.
            await machine_run(client, image, state, 0)
            await direct_run(work / "warm", files, 0)
            results: dict[str, list[dict[str, float]]] = {"direct": [], "machine": []}
            for i in range(args.runs):
                order = ["direct", "machine"] if i % 2 == 0 else ["machine", "direct"]
                for kind in order:
                    if kind == "direct":
                        results[kind].append(await direct_run(work / f"d{i}", files, args.idle))
                    else:
                        results[kind].append(await machine_run(client, image, state, args.idle))
                    print(f"run {i} {kind}: {results[kind][-1]}", file=sys.stderr)
        finally:
            if client is not None:
                await client.close()
            daemon.kill()
            _stop(registry)
    print(f"\n{args.runs} runs each, alternating; medians; ratio = machine / direct\n")
    print("| measure | direct (VM layer) | machine (MachineRuntime) | ratio |")
    print("|---|---|---|---|")
    for key, label, unit, scale in (
        ("running", "start -> RUNNING", "s", 1.0), ("console", "start -> first console line",
                                                     "s", 1.0),
        ("hotplug", "disk hotplug -> seen in the guest", "s", 1.0),
        ("pss", "QEMU PSS, idle", "MiB", 1 / 1024), ("rss", "QEMU RSS, idle", "MiB", 1 / 1024),
    ):
        direct = statistics.median(r[key] for r in results["direct"]) * scale
        machine = statistics.median(r[key] for r in results["machine"]) * scale
        print(f"| {label} | {direct:.2f} {unit} | {machine:.2f} {unit} | "
              f"{machine / direct:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
