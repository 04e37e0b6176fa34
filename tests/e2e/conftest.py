"""End-to-end fixtures: the real daemon with the micro-VM backend, booting real QEMU guests
(TCG here). Paths are kept short: QEMU's sockets must fit AF_UNIX's 107 bytes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from criserver.vm import assets, process
from tests.cri_client import CRIClient, msg
from tests.daemon import Daemon, process_cmdlines, unmount_under

pytestmark = pytest.mark.vm


def require_assets() -> None:
    try:
        assets.load()
    except assets.AssetsError as exc:
        if os.environ.get("CI"):
            raise  # CI builds them (make test -> make guest): missing is a failure there
        pytest.skip(f"guest assets missing: {exc.message}")


def network_config(workdir: Path) -> str:
    """A built-in network of the test's own (bridge, subnet, conf dir), so tests never touch
    the host's CNI configuration or each other."""
    tag = secrets.token_hex(3)
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24"
    return "\n".join([
        "[network]",
        f'cni_conf_dir = "{workdir}/net.d"',
        f'default_network_name = "crt-{tag}"',
        f'default_bridge = "crt{tag}"',
        f'default_subnet = "{subnet}"',
    ]) + "\n"


def handler_config(handler: str, backend: str, **options: object) -> str:
    """A handler's config section; an option given as None keeps the daemon's default."""
    options = {k: v for k, v in options.items() if v is not None}
    lines = [f"[runtimes.{handler}]", f'backend = "{backend}"']
    if options:
        rendered = ", ".join(f"{k} = {_toml(v)}" for k, v in options.items())
        lines.append(f"options = {{ {rendered} }}")
    return "\n".join(lines) + "\n"


def microvm_config(workdir: Path, **options: object) -> str:
    """The micro-VM handler, on a built-in network of its own. Without a warm pool unless
    asked (`warm_pool=1`, or None for the default): a test that counts its daemon's VMs, netns
    and files, or times a call, should not meet the pool's, and CI's two cores are not spent
    on warming VMs no test takes."""
    options.setdefault("warm_pool", 0)
    return network_config(workdir) + handler_config("microvm", "microvm", **options)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def network_names(daemon: Daemon) -> tuple[str, str]:
    """The daemon's private CNI network and bridge names, from its config."""
    text = daemon.config_path.read_text()
    network = re.search(r'default_network_name = "([\w-]+)"', text)
    bridge = re.search(r'default_bridge = "(\w+)"', text)
    assert network is not None and bridge is not None
    return network[1], bridge[1]


def remove_network(daemon: Daemon) -> None:
    """What CNI leaves by design once the last pod is gone: the bridge and the IPAM dir."""
    network, bridge = network_names(daemon)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
    shutil.rmtree(Path("/var/lib/cni/networks") / network, ignore_errors=True)


def short_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="crs-", dir="/tmp"))


@pytest.fixture(scope="module")
def vm_daemon() -> Iterator[Daemon]:
    """One micro-VM daemon per test module (booting guests under TCG is the slow part)."""
    with running_vm_daemon() as daemon:
        yield daemon


@contextmanager
def running_vm_daemon(extra_config: str = "", **options: object) -> Iterator[Daemon]:
    """A micro-VM daemon on a network of its own (`options`: the microvm handler's); afterwards
    its pods, VMs, network and mounts are gone, and its log and the guests' consoles are kept
    for a look."""
    require_assets()
    workdir = short_workdir()
    daemon = Daemon(workdir, config=microvm_config(workdir, **options) + extra_config).start()
    try:
        yield daemon
    finally:
        tear_down(daemon, workdir, keep_workdir=True)
        keep_logs(daemon, workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def keep_logs(daemon: Daemon, workdir: Path) -> None:
    """Kept for a look after a failure: the daemon's log and the guests' consoles."""
    keep = Path(tempfile.gettempdir()) / "criserver-e2e-logs"
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir()
    shutil.copy(daemon.log_path, keep / "daemon.log")
    for console in workdir.rglob("vm.log"):
        shutil.copy(console, keep / f"{console.parent.name}-vm.log")


def tear_down(daemon: Daemon, workdir: Path, keep_workdir: bool = False) -> None:
    """Whatever a test did with its own daemon: its pods, VMs, network and mounts gone."""
    remove_all_pods(daemon)
    daemon.kill()
    kill_vms_under(workdir)
    remove_network(daemon)
    unmount_under(workdir)
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def remove_all_pods(daemon: Daemon) -> None:
    """Remove what the tests left through the daemon itself, so their networks (netns, veths,
    IP allocations, iptables rules) are torn down too, not just their VMs killed."""
    if daemon.process is None or daemon.process.poll() is not None:
        return

    async def remove() -> None:
        cri = daemon.client()
        try:
            for pod in (await cri.runtime.ListPodSandbox()).items:
                await cri.runtime.RemovePodSandbox(
                    msg("RemovePodSandboxRequest", pod_sandbox_id=pod.id), timeout=60)
        finally:
            await cri.close()

    try:
        # A thread of its own: callers may be inside a running event loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, remove()).result()
    except Exception as exc:  # the VMs are killed below in any case
        print(f"warning: removing the test pods failed: {exc!r}")


def qemu_pids(marker: str = "process=criserver-vm") -> dict[int, str]:
    """Running QEMU processes of criserver: pid -> command line."""
    return {pid: cmd for pid, cmd in process_cmdlines().items() if marker in cmd}


def vm_pids_of(pod_id: str) -> list[int]:
    """The pod's QEMU: one started under the pod's id, or a pooled VM the pod took (named
    pool-..., found through the link named after the pod beside its state dir, as the daemon
    finds it)."""
    return [pid for pid, cmd in qemu_pids().items()
            if f"-name {pod_id}," in cmd or _took_pooled(pod_id, pid, cmd)]


def _took_pooled(pod_id: str, pid: int, cmd: str) -> bool:
    pooled = re.search(r"-pidfile (\S*)/pool-\w+/qemu\.pid", cmd)
    return pooled is not None and process.is_qemu_of(
        pid, Path(pooled[1]) / pod_id[:16] / "qemu.pid")


def kill_vms_under(workdir: Path) -> None:
    """Never leave a QEMU behind, whatever the test did."""
    for pid, cmd in qemu_pids().items():
        if str(workdir) in cmd:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def qemus_of(workdir: Path) -> list[int]:
    return [pid for pid, cmd in qemu_pids().items() if str(workdir) in cmd]


def backend_leftovers(daemon: Daemon) -> list[str]:
    """What pods left in the backend's directories (the daemon's own files excepted)."""
    found: list[str] = []
    for base in (daemon.state / "runtimes" / "microvm", daemon.root / "runtimes" / "microvm"):
        for path in base.rglob("*"):
            daemon_own = path.name in ("accel.json", "accel.lock") or (
                path.is_dir() and path.name in ("volumes", "pods", "templates"))
            if not daemon_own:
                found.append(str(path.relative_to(base)))
    return found


def bridge_ports(daemon: Daemon) -> list[str]:
    """The links plugged into the daemon's own CNI bridge (other tests may make other links)."""
    ports = Path("/sys/class/net") / network_names(daemon)[1] / "brif"
    return sorted(p.name for p in ports.iterdir()) if ports.exists() else []


async def iptables_rules() -> list[str]:
    proc = await asyncio.create_subprocess_exec("iptables-save", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return [line for line in out.decode().splitlines() if line.startswith("-A")]


async def wait_pool_filled(cri: CRIClient, max_wait: float = 300.0) -> None:
    """Until the microvm handler's warm pool is full (its first pod boots, its template is
    built, then the pool fills)."""
    deadline = time.monotonic() + max_wait
    while True:
        status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
        pool = json.loads(status.info["runtime.microvm"])["warmPool"]
        if pool["ready"] >= pool["size"]:
            return
        assert time.monotonic() < deadline, f"the warm pool did not fill: {pool}"
        await asyncio.sleep(0.5)
