"""Container numbers in real micro-VMs (TCG), one VM per guest OCI runtime set-up, in one run:
create/start latency with crun (the default) and with runc, guest memory per idle container,
and ExecSync `true` at the agent: in the guest itself (no container: the floor), through vmexec
with and without the RuntimeDefault seccomp profile, and through `crun exec` and `runc exec`
(agents with exec_mode=runtime).

Usage: .venv/bin/python -m bench.containers_in_vm [--assets DIR] [--containers N] [--execs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from criserver.backends.microvm.channel import AgentAddress, AgentClient
from criserver.runtime.seccomp_default import default_profile
from criserver.vm import assets as assets_mod
from criserver.vm.qemu import VMSpec
from criserver.vm.vm import VM
from tests.vmagent.containerkit import busybox_rootfs, container_vm_spec, make_erofs, oci_spec
from vmagent.api import agent_pb2 as pb


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] * 1000


async def exec_times(client: AgentClient, cid: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        r = await client.exec_sync(pb.ExecSyncRequest(
            container_id=cid, process=pb.Process(argv=["true"]), timeout_seconds=30))
        times.append(time.monotonic() - t0)
        assert r.exit_code == 0, r
    return times


def report(label: str, times: list[float]) -> None:
    print(f"ExecSync true, {label}: p50 {pct(times, 50):.1f} ms  p99 {pct(times, 99):.1f} ms  "
          f"(n={len(times)})")


def seccomp_spec() -> bytes:
    spec = json.loads(oci_spec(["sleep", "100000"]))
    spec["linux"]["seccomp"] = default_profile(spec["process"]["capabilities"]["bounding"])
    return json.dumps(spec).encode()


async def main(assets_dir: Path, n_containers: int, n_execs: int) -> None:
    assets = assets_mod.load(assets_dir)
    work = Path(tempfile.mkdtemp(prefix="ctrbench-"))
    try:
        (work / "images").mkdir()
        image = make_erofs(busybox_rootfs(work / "rootfs"), work / "images")
        for name, settings in SETUPS.items():
            (work / name).mkdir()
            (work / name / "images").symlink_to(work / "images")
            spec = container_vm_spec(f"ctrbench-{os.getpid()}-{name}", work / name,
                                     assets, settings=settings)
            print(f"--- {name}: agent settings {settings or 'defaults'}")
            await one_vm(spec, image, name, n_containers, n_execs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# name -> agent settings. "crun": the default runtime, execs through vmexec (the default).
SETUPS: dict[str, dict[str, str]] = {
    "crun": {},
    "crun-exec": {"exec_mode": "runtime"},
    "runc": {"oci_runtime": "runc", "exec_mode": "runtime"},
}


async def one_vm(spec: VMSpec, image: str, name: str, n_containers: int,
                 n_execs: int) -> None:
    work = spec.state_dir
    machine = VM(spec)
    await machine.start()
    client = AgentClient(spec.vm_id, AgentAddress(unix_path=str(work / "agent.sock")),
                         call_timeout=120)
    try:
        await client.wait_ready(time.monotonic() + 180)
        await client.setup_sandbox(pb.SetupSandboxRequest(request_id="s", sandbox_id="p"))

        async def create(cid: str, raw: bytes) -> tuple[float, float]:
            t0 = time.monotonic()
            await client.call("CreateContainer", pb.CreateContainerRequest(
                container_id=cid, sandbox_id="p", oci_spec_json=raw,
                rootfs=pb.Rootfs(lowers=[pb.Mount(type="erofs", source=f"image:{image}")])))
            t1 = time.monotonic()
            await client.call("StartContainer", pb.StartContainerRequest(container_id=cid))
            return t1 - t0, time.monotonic() - t1

        warm = await create("warmup", oci_spec(["sleep", "100000"]))  # first use: mounts
        print(f"first container (mounts the share and image): create {warm[0]:.3f}s "
              f"start {warm[1]:.3f}s")
        await asyncio.sleep(2)
        before = (await client.stats()).guest.memory_available_bytes
        creates, starts = [], []
        for i in range(n_containers):
            c, s = await create(f"idle{i}", oci_spec(["sleep", "100000"]))
            creates.append(c)
            starts.append(s)
        await asyncio.sleep(2)
        stats = await client.stats()
        after = stats.guest.memory_available_bytes
        cg = [c.memory_usage_bytes for c in stats.containers if c.container_id.startswith("idle")]
        print(f"create: median {statistics.median(creates):.3f}s  start: median "
              f"{statistics.median(starts):.3f}s  (n={n_containers}, host-observed)")
        print(f"guest memory per idle container: {(before - after) / n_containers / 2**20:.2f} "
              f"MiB (MemAvailable delta); cgroup memory.current median "
              f"{statistics.median(cg) / 2**20:.2f} MiB")
        if name != "crun":
            await create("seccomp", seccomp_spec())
            report(f"{name.split('-')[0]} exec, RuntimeDefault seccomp", await exec_times(
                client, "seccomp", n_execs))
            await client.shutdown()
            return
        await create("seccomp", seccomp_spec())
        for label, cid in (("guest (no container)", ""), ("vmexec", "idle0"),
                           ("vmexec, RuntimeDefault seccomp", "seccomp")):
            report(label, await exec_times(client, cid, n_execs))
        await client.shutdown()
    finally:
        client.close()
        if not machine.exited:
            await machine.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, default=Path(
        os.environ.get("CRISERVER_GUEST_ASSETS", assets_mod.DEFAULT_ASSETS_DIR)))
    ap.add_argument("--containers", type=int, default=5)
    ap.add_argument("--execs", type=int, default=100)
    a = ap.parse_args()
    asyncio.run(main(a.assets, a.containers, a.execs))
