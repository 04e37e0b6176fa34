"""Pods on the host with the runc handler, end to end: the real daemon, Debian's runc, ctrmon
built from this checkout, images from the real registry process, a CNI network of the test's
own. No VM is booted: these run beside the micro-VM tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from criserver.backends.runc.build import build_ctrmon
from tests.cri_client import enum, msg
from tests.daemon import Daemon, process_cmdlines
from tests.e2e.conftest import handler_config, network_config, network_names, tear_down
from tests.e2e.test_containers_vm import Pod, running_pod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers: needs root")

LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")


@pytest.fixture(scope="module")
def ctrmon() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ctrmon-") as directory:
        binary = Path(directory) / "ctrmon"
        build_ctrmon(binary)
        yield binary


def runc_daemon_config(workdir: Path, ctrmon: Path) -> str:
    return ('[runtime]\ndefault_handler = "runc"\n' + network_config(workdir)
            + handler_config("runc", "runc", monitor=str(ctrmon)))


@pytest.fixture(scope="module")
def runc_daemon(ctrmon: Path) -> Iterator[Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="crr-", dir="/tmp"))
    daemon = Daemon(workdir, config=runc_daemon_config(workdir, ctrmon)).start()
    try:
        yield daemon
    finally:
        tear_down(daemon, workdir)


@pytest.fixture
async def pod(runc_daemon: Daemon, busybox_ref: str, tmp_path: Path) -> AsyncIterator[Pod]:
    async with running_pod(runc_daemon, busybox_ref, "host-pod", tmp_path / "logs",
                           hostname="host-pod", linux=pod_linux()) as p:
        yield p


def pod_linux(**modes: str) -> object:
    """A pod's linux config with its namespace modes (kubelet sends pid CONTAINER unless the
    pod shares its process namespace)."""
    options = msg("NamespaceOption", **{k: enum(v) for k, v in {"pid": "CONTAINER",
                                                                **modes}.items()})
    return msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", namespace_options=options))


def records(path: Path) -> list[tuple[str, str, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        match = LOG_LINE.match(line)
        assert match, line
        out.append((match[2].decode(), match[3].decode(), match[4]))
    return out


async def test_exit_code_logs_and_exec(pod: Pod) -> None:
    cid = await pod.container("exits", "sh", "-c", "echo out; echo err >&2; exit 3")
    status = await pod.wait_exit(cid, poll=0.05)
    assert status.exit_code == 3 and status.reason == "Error"  # type: ignore[attr-defined]
    assert status.finished_at >= status.started_at > 0  # type: ignore[attr-defined]
    logged = records(pod.logs / "exits.log")
    assert ("stdout", "F", b"out") in logged and ("stderr", "F", b"err") in logged
    ok = await pod.container("completes", "true")
    status = await pod.wait_exit(ok, poll=0.05)
    assert status.exit_code == 0 and status.reason == "Completed"  # type: ignore[attr-defined]

    sleeper = await pod.container("sleeper", "sleep", "3600")
    r = await pod.exec(sleeper, "sh", "-c", "echo hi; hostname; exit 4")
    assert r.exit_code == 4 and r.stdout == b"hi\nhost-pod\n"  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="timed out"):
        await pod.exec(sleeper, "sleep", "60", timeout=1)
    # The timed-out process was killed, not just runc.
    r = await pod.exec(sleeper, "sh", "-c", "ps -o comm | grep -c '^sleep$'")
    assert r.stdout.strip() == b"1"  # type: ignore[attr-defined]


async def test_a_pod_without_log_directory(runc_daemon: Daemon, busybox_ref: str) -> None:
    cri = runc_daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest",
                                      image=msg("ImageSpec", image=busybox_ref)))
        pod_id = await cri.run_pod("nolog", linux=pod_linux())
        cid = await cri.create_container(pod_id, "quiet", pod_name="nolog", image=busybox_ref,
                                         command=["sh", "-c", "echo nowhere; exit 2"])
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        status = await Pod(cri, pod_id, "nolog", Path("/nonexistent"), busybox_ref).wait_exit(
            cid, poll=0.05)
        assert status.exit_code == 2 and status.log_path == ""  # type: ignore[attr-defined]
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    finally:
        await cri.close()


async def test_stop_kills_after_the_timeout(pod: Pod) -> None:
    # PID 1 ignores SIGTERM it has no handler for: StopContainer must come to SIGKILL.
    cid = await pod.container("stubborn", "sleep", "3600")
    await pod.cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid, timeout=1))
    status = await pod.status(cid)
    assert status.state == enum("CONTAINER_EXITED")  # type: ignore[attr-defined]
    assert status.exit_code == 137  # type: ignore[attr-defined]


async def test_stats_resources_and_oom(pod: Pod) -> None:
    cid = await pod.container("measured", "sh", "-c", "while :; do :; done")
    await asyncio.sleep(1)
    stats = (await pod.cri.runtime.ContainerStats(
        msg("ContainerStatsRequest", container_id=cid))).stats
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 0
    pod_stats = (await pod.cri.runtime.PodSandboxStats(
        msg("PodSandboxStatsRequest", pod_sandbox_id=pod.id))).stats
    assert pod_stats.linux.cpu.usage_core_nano_seconds.value >= (
        stats.cpu.usage_core_nano_seconds.value)
    assert pod_stats.linux.network.default_interface.name == "eth0"
    assert [c.attributes.id for c in pod_stats.linux.containers] == [cid]

    await pod.cri.runtime.UpdateContainerResources(msg(
        "UpdateContainerResourcesRequest", container_id=cid,
        linux=msg("LinuxContainerResources", memory_limit_in_bytes=64 * 1024 * 1024)))
    info = (await pod.cri.runtime.ContainerStatus(
        msg("ContainerStatusRequest", container_id=cid, verbose=True))).info
    cgroup = json.loads(info["info"])["cgroup"]
    limit = Path(f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes")
    if not limit.parent.is_dir():  # cgroup v2
        limit = Path(f"/sys/fs/cgroup{cgroup}/memory.max")
    assert limit.read_text().strip() == str(64 * 1024 * 1024)

    hog = await pod.container(
        "hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
        linux=msg("LinuxContainerConfig", resources=msg(
            "LinuxContainerResources", memory_limit_in_bytes=16 * 1024 * 1024)))
    status = await pod.wait_exit(hog, poll=0.1)
    assert status.exit_code == 137 and status.reason == "OOMKilled"  # type: ignore[attr-defined]


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A host directory that is a shared mount, as kubelet's /var/lib/kubelet is."""
    path = tmp_path / "propagated"
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-R", "-l", str(path)], check=False)


@pytest.mark.parametrize(("propagation", "into", "out_of"), [
    ("PROPAGATION_BIDIRECTIONAL", True, True),
    ("PROPAGATION_HOST_TO_CONTAINER", True, False),
    ("PROPAGATION_PRIVATE", False, False),
])
async def test_mount_propagation(runc_daemon: Daemon, busybox_ref: str, tmp_path: Path,
                                 shared_dir: Path, propagation: str, into: bool,
                                 out_of: bool) -> None:
    privileged = msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", privileged=True,
        namespace_options=msg("NamespaceOption", pid=enum("CONTAINER"))))
    (shared_dir / "from-host").mkdir()
    (shared_dir / "from-pod").mkdir()
    async with running_pod(runc_daemon, busybox_ref, "mounts", tmp_path / "logs",
                           linux=privileged) as p:
        cid = await p.container(
            "mounter", "sleep", "3600",
            mounts=[msg("Mount", container_path="/shared", host_path=str(shared_dir),
                        propagation=enum(propagation))],
            linux=msg("LinuxContainerConfig", security_context=msg(
                "LinuxContainerSecurityContext", privileged=True,
                namespace_options=msg("NamespaceOption", pid=enum("CONTAINER")))))
        subprocess.run(["mount", "-t", "tmpfs", "host-tmpfs", str(shared_dir / "from-host")],
                       check=True)
        (shared_dir / "from-host" / "marker").write_text("host")
        r = await p.exec(cid, "cat", "/shared/from-host/marker")
        assert (r.stdout == b"host") == into, r  # type: ignore[attr-defined]
        r = await p.exec(cid, "sh", "-c", "mount -t tmpfs pod-tmpfs /shared/from-pod && "
                                          "echo pod > /shared/from-pod/marker")
        assert r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
        seen = (shared_dir / "from-pod" / "marker").exists()
        assert seen == out_of


def _snapshot(daemon: Daemon) -> dict[str, set[str]]:
    workdir = daemon.workdir
    mounts = {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}
    cgroups = {str(p) for p in Path("/sys/fs/cgroup").glob("*/criserver/*")}
    monitors = {str(pid) for pid, cmd in process_cmdlines().items()
                if "ctrmon" in cmd and str(workdir) in cmd}
    netns = {p.name for p in (workdir / "state" / "netns").glob("*")}
    network, _ = network_names(daemon)
    ips = {p.name for p in (Path("/var/lib/cni/networks") / network).glob("*.*.*.*")}
    return {"mounts": {m for m in mounts if m.startswith(str(workdir))}, "cgroups": cgroups,
            "monitors": monitors, "netns": netns, "ips": ips}



async def test_removing_the_pod_leaves_nothing(runc_daemon: Daemon, busybox_ref: str,
                                               tmp_path: Path) -> None:
    # A first pod makes the directories the daemon keeps shared for good (as `ip netns` keeps
    # /run/netns): taken before the snapshot, whatever ran before this test.
    async with running_pod(runc_daemon, busybox_ref, "warm-pod", tmp_path / "warm",
                           linux=pod_linux()) as warm:
        await warm.container("runs", "true")
    before = _snapshot(runc_daemon)
    async with running_pod(runc_daemon, busybox_ref, "clean-pod", tmp_path,
                           linux=pod_linux()) as p:
        await p.container("runs", "sleep", "3600")
        during = _snapshot(runc_daemon)
        assert during["monitors"] - before["monitors"]
        assert during["netns"] - before["netns"]
        assert during["mounts"] - before["mounts"]
        assert during["ips"] - before["ips"]
    assert _snapshot(runc_daemon) == before


async def test_host_namespaces(runc_daemon: Daemon, busybox_ref: str, tmp_path: Path) -> None:
    shm = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True)
    shm_id = re.search(r"(\d+)", shm.stdout)
    assert shm_id is not None
    port = _free_port()
    options = msg("NamespaceOption", network=enum("NODE"), pid=enum("NODE"), ipc=enum("NODE"))
    try:
        async with running_pod(
                runc_daemon, busybox_ref, "node-pod", tmp_path,
                linux=msg("LinuxPodSandboxConfig", security_context=msg(
                    "LinuxSandboxSecurityContext", namespace_options=options))) as p:
            cid = await p.container(
                "node", "nc", "-l", "-p", str(port), "-e", "echo", "from-the-pod",
                linux=msg("LinuxContainerConfig", security_context=msg(
                    "LinuxContainerSecurityContext", namespace_options=options)))
            for kind in ("net", "pid", "ipc"):
                r = await p.exec(cid, "readlink", f"/proc/self/ns/{kind}")
                assert r.stdout.decode().strip() == os.readlink(  # type: ignore[attr-defined]
                    f"/proc/self/ns/{kind}"), kind
            r = await p.exec(cid, "test", "-d", f"/proc/{os.getpid()}")
            assert r.exit_code == 0  # type: ignore[attr-defined]  # a host process, by pid
            r = await p.exec(cid, "cat", "/proc/sysvipc/shm")
            assert re.search(rf"^\s*-?\d+\s+{shm_id[1]}\s", r.stdout.decode(),  # type: ignore[attr-defined]
                             re.MULTILINE)
            # Reachable on the host's own address.
            assert await asyncio.to_thread(_read_from, port) == b"from-the-pod\n"
    finally:
        subprocess.run(["ipcrm", "-m", shm_id[1]], check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_from(port: int) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                return conn.makefile("rb").read()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def test_logs_and_exit_codes_across_a_daemon_sigkill(
        ctrmon: Path, busybox_ref: str, tmp_path: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="crk-", dir="/tmp"))
    daemon = Daemon(workdir, config=runc_daemon_config(workdir, ctrmon)).start()
    cri = daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec",
                                                                    image=busybox_ref)))
        p = Pod(cri, await cri.run_pod("kill-pod", log_directory=str(tmp_path),
                                       linux=pod_linux()), "kill-pod", tmp_path, busybox_ref)
        # One ends while the daemon is down, one outlives the restart.
        ends = await p.container(
            "ends", "sh", "-c", "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo $i; "
            "usleep 10000; done; exit 5")
        lives = await p.container(
            "lives", "sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; usleep 20000; done")
        await asyncio.sleep(1)
        daemon.stop(signal.SIGKILL)
        await cri.close()
        await asyncio.sleep(4)  # "ends" finishes meanwhile
        daemon.start()
        p.cri = cri = daemon.client()
        status = await p.wait_exit(ends, timeout=20)
        assert status.exit_code == 5  # type: ignore[attr-defined]
        lines = [c for s, _, c in records(tmp_path / "ends.log") if s == "stdout"]
        assert lines == [str(i).encode() for i in range(1, 301)]
        state = await p.status(lives)
        assert state.state == enum("CONTAINER_RUNNING")  # type: ignore[attr-defined]
        await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=lives,
                                            timeout=0))
        status = await p.wait_exit(lives, timeout=20)
        assert status.exit_code == 137  # type: ignore[attr-defined]
        lines = [c for s, _, c in records(tmp_path / "lives.log") if s == "stdout"]
        assert lines == [str(i).encode() for i in range(1, len(lines) + 1)]
        assert len(lines) > 150  # it kept logging while the daemon was down
    finally:
        await cri.close()
        tear_down(daemon, workdir)


def _named_after(ids: set[str], top: Path, depth: int, skip: Path) -> list[Path]:
    """Entries under `top` (down to `depth` levels, not into `skip`) named after an ID."""
    found: list[Path] = []
    try:
        entries = list(top.iterdir())
    except OSError:
        return found
    for entry in entries:
        if entry == skip:
            continue
        if any(i in entry.name for i in ids):
            found.append(entry)
        if depth > 1 and entry.is_dir() and not entry.is_symlink():
            found += _named_after(ids, entry, depth - 1, skip)
    return found


async def test_a_pods_files_stay_under_root_and_state(runc_daemon: Daemon, busybox_ref: str,
                                                      tmp_path: Path) -> None:
    """Issue 18's security review: the daemon makes nothing for a pod outside its root and
    state dirs (and the pod's log directory); the files that carry a container's environment
    are readable by root only."""
    async with running_pod(runc_daemon, busybox_ref, "files-pod", tmp_path / "logs",
                           linux=pod_linux()) as p:
        cid = await p.container("env", "sleep", "3600",
                                envs=[msg("KeyValue", key="TOKEN", value=b"s3cr3t-env")])
        ids = {p.id, cid, p.id[:12], cid[:12]}
        outside = [path for top, depth in ((Path("/run"), 4), (Path("/tmp"), 2),
                                           (Path("/var/lib"), 4), (Path("/dev/shm"), 2),
                                           (Path("/etc"), 2), (Path("/var/run"), 1))
                   for path in _named_after(ids, top, depth, runc_daemon.workdir)]
        assert outside == []
        holders = 0
        for top in (runc_daemon.root, runc_daemon.state):
            for path in top.rglob("*"):
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                    with contextlib.suppress(OSError):
                        if b"s3cr3t-env" in path.read_bytes():
                            holders += 1
                            assert not _others_read(path, top), \
                                f"{path} holds the container's environment"
        assert holders  # the check saw the files it is about (bundle, database)


def _others_read(path: Path, top: Path) -> bool:
    """Whether a user other than the owner reads `path`: the file readable by group or others
    and every directory on the way from `top` (the daemon's root or state dir, wherever the
    test put it) searchable by them."""
    if not path.stat().st_mode & 0o044:
        return False
    return all(d.stat().st_mode & 0o011 for d in [path.parent, *path.parent.parents]
               if d == top or top in d.parents)
