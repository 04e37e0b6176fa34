"""Containers in real micro-VMs through the CRI socket, from an image pulled from a real
registry: life cycle, exit reasons, logs, exec, stats, volumes, security context, network."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon
from tests.e2e.conftest import vm_pids_of

pytestmark = pytest.mark.vm

LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")


@dataclass
class Pod:
    cri: CRIClient
    id: str
    name: str
    logs: Path
    image: str

    async def container(self, name: str, *command: str, start: bool = True,
                        **fields: object) -> str:
        cid = await self.cri.create_container(
            self.id, name, pod_name=self.name, image=self.image, command=list(command),
            log_path=f"{name}.log", **fields)
        if start:
            await self.cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        return cid

    async def status(self, cid: str) -> object:
        r = await self.cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
        return r.status

    async def wait_exit(self, cid: str, timeout: float = 60, poll: float = 0.2) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.status(cid)
            if status.state == enum("CONTAINER_EXITED"):  # type: ignore[attr-defined]
                return status
            await asyncio.sleep(poll)
        raise TimeoutError(f"container {cid} did not exit")

    async def remove(self, cid: str) -> None:
        await self.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))

    async def image_id(self) -> str:
        r = await self.cri.image.ImageStatus(msg("ImageStatusRequest", image=msg(
            "ImageSpec", image=self.image)))
        return str(r.image.id)

    async def exec(self, cid: str, *cmd: str, timeout: int = 30) -> object:
        return await self.cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid,
                                                   cmd=list(cmd), timeout=timeout))

    def log_records(self, name: str) -> list[tuple[str, str, bytes]]:
        records = []
        for line in (self.logs / f"{name}.log").read_bytes().splitlines():
            match = LOG_LINE.match(line)
            assert match, line
            records.append((match[2].decode(), match[3].decode(), match[4]))
        return records


@asynccontextmanager
async def running_pod(daemon: Daemon, image: str, name: str, logs: Path,
                      **pod_fields: object) -> AsyncIterator[Pod]:
    """A pod of `daemon` with `image` pulled, stopped and removed afterwards."""
    cri = daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)))
        pod_id = await cri.run_pod(name, log_directory=str(logs), **pod_fields)
        try:
            yield Pod(cri, pod_id, name, logs, image)
        finally:
            await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
            await cri.runtime.RemovePodSandbox(
                msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    finally:
        await cri.close()


DNS = {"servers": ["10.96.0.10"], "searches": ["ns.svc.cluster.local"], "options": ["ndots:5"]}


async def _pod(cri: CRIClient, image: str, name: str, tmp: Path) -> Pod:
    logs = tmp / name
    pod_id = await cri.run_pod(name, log_directory=str(logs), hostname=name,
                               dns_config=msg("DNSConfig", **DNS))
    return Pod(cri, pod_id, name, logs, image)


@pytest.fixture(scope="module")
async def pod(vm_daemon: Daemon, busybox_ref: str,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    cri = vm_daemon.client()
    pulled = await cri.image.PullImage(msg("PullImageRequest", image=msg(
        "ImageSpec", image=busybox_ref)))
    assert pulled.image_ref.startswith("sha256:")
    p = await _pod(cri, busybox_ref, "ctr-pod", tmp_path_factory.mktemp("logs"))
    yield p
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=p.id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=p.id))
    await cri.close()


async def test_exit_code_and_logs(pod: Pod) -> None:
    cid = await pod.container("exits", "sh", "-c", "echo out; echo err >&2; exit 3")
    status = await pod.wait_exit(cid)
    assert status.exit_code == 3 and status.reason == "Error"  # type: ignore[attr-defined]
    assert status.finished_at >= status.started_at > 0  # type: ignore[attr-defined]
    assert status.image_id.startswith("sha256:")  # type: ignore[attr-defined]
    records = pod.log_records("exits")
    assert ("stdout", "F", b"out") in records and ("stderr", "F", b"err") in records
    ok = await pod.container("completes", "true")
    status = await pod.wait_exit(ok)
    assert status.exit_code == 0 and status.reason == "Completed"  # type: ignore[attr-defined]


async def test_partial_and_long_lines(pod: Pod) -> None:
    cid = await pod.container(
        "partial", "sh", "-c",
        "printf abc; sleep 1; printf 'def\\n'; head -c 20000 /dev/zero | tr '\\0' x; echo")
    await pod.wait_exit(cid)
    records = [r for r in pod.log_records("partial") if r[0] == "stdout"]
    text = b"".join(content for _, _, content in records)
    assert text.startswith(b"abcdef") and text.count(b"x") == 20000
    assert [tag for _, tag, _ in records][-1] == "F"
    assert any(tag == "P" for _, tag, _ in records)  # 'abc' then the 16 KiB split


async def test_exec_sync_stop_and_stats(pod: Pod) -> None:
    # Ignores SIGTERM (the pod shares one PID namespace, so it is not PID 1 there).
    cid = await pod.container("sleeper", "sh", "-c", "trap '' TERM; sleep 3600")
    assert (await pod.status(cid)).state == enum("CONTAINER_RUNNING")  # type: ignore[attr-defined]
    reply = await pod.exec(cid, "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"hi\n", b"oops\n", 7)  # type: ignore[attr-defined]
    assert (await pod.exec(cid, "hostname")).stdout.strip() == pod.name.encode()  # type: ignore[attr-defined]
    resolv = (await pod.exec(cid, "cat", "/etc/resolv.conf")).stdout.decode()  # type: ignore[attr-defined]
    assert resolv == ("nameserver 10.96.0.10\nsearch ns.svc.cluster.local\noptions ndots:5\n")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pod.exec(cid, "sleep", "30", timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Busy for a moment, so the CPU counter moves.
    await pod.exec(cid, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    stats = await pod.cri.runtime.ContainerStats(msg("ContainerStatsRequest", container_id=cid))
    assert stats.stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.stats.memory.working_set_bytes.value > 0
    listed = await pod.cri.runtime.ListContainerStats(msg("ListContainerStatsRequest"))
    assert cid in {s.attributes.id for s in listed.stats}
    pod_stats = await pod.cri.runtime.PodSandboxStats(msg("PodSandboxStatsRequest",
                                                          pod_sandbox_id=pod.id))
    assert pod_stats.stats.linux.memory.working_set_bytes.value > 0
    metrics = await pod.cri.runtime.ListPodSandboxMetrics(msg("ListPodSandboxMetricsRequest"))
    mine = next(m for m in metrics.pod_metrics if m.pod_sandbox_id == pod.id)
    ours = next(c for c in mine.container_metrics if c.container_id == cid)
    by_name = {m.name: m for m in ours.metrics}
    assert by_name["container_processes"].value.value >= 1  # more in tests/e2e/test_metrics_vm
    assert by_name["container_cpu_usage_seconds_total"].metric_type == enum("COUNTER")
    assert by_name["container_memory_working_set_bytes"].value.value > 0
    await pod.cri.runtime.UpdateContainerResources(msg(
        "UpdateContainerResourcesRequest", container_id=cid,
        linux=msg("LinuxContainerResources", memory_limit_in_bytes=96 * 1024 * 1024)))
    limit = await pod.exec(cid, "sh", "-c", "cat /sys/fs/cgroup/memory.max")
    assert limit.stdout.strip() == str(96 * 1024 * 1024).encode(), limit  # type: ignore[attr-defined]
    started = time.monotonic()
    # SIGTERM is ignored: the kill follows the grace period.
    await pod.cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid, timeout=2))
    status = await pod.status(cid)
    assert status.state == enum("CONTAINER_EXITED")  # type: ignore[attr-defined]
    assert status.exit_code == 137 and time.monotonic() - started >= 2  # type: ignore[attr-defined]
    await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))


async def test_oom_killed(pod: Pod) -> None:
    resources = msg("LinuxContainerResources", memory_limit_in_bytes=16 * 1024 * 1024)
    cid = await pod.container("hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
                              linux=msg("LinuxContainerConfig", resources=resources))
    status = await pod.wait_exit(cid)
    assert status.reason == "OOMKilled", status  # type: ignore[attr-defined]
    assert status.exit_code != 0  # type: ignore[attr-defined]


async def test_shared_empty_dir(pod: Pod, tmp_path: Path) -> None:
    volume = tmp_path / "empty-dir"
    volume.mkdir()
    mount = msg("Mount", container_path="/data", host_path=str(volume))
    writer = await pod.container("writer", "sh", "-c", "echo shared > /data/note; sleep 3600",
                                 mounts=[mount])
    reader = await pod.container("reader", "sleep", "3600", mounts=[mount])
    deadline = time.monotonic() + 30
    while not (volume / "note").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert (volume / "note").read_text() == "shared\n"  # on the host
    assert (await pod.exec(reader, "cat", "/data/note")).stdout == b"shared\n"  # type: ignore[attr-defined]
    for cid in (writer, reader):
        await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
    assert (volume / "note").exists()  # removing the containers leaves the volume's data


async def test_security_context(pod: Pod) -> None:
    security = msg("LinuxContainerSecurityContext",
                   run_as_user=msg("Int64Value", value=1000), readonly_rootfs=True,
                   capabilities=msg("Capability", drop_capabilities=["ALL"]))
    cid = await pod.container("secure", "sleep", "3600",
                              linux=msg("LinuxContainerConfig", security_context=security))
    assert (await pod.exec(cid, "id", "-u")).stdout.strip() == b"1000"  # type: ignore[attr-defined]
    touch = await pod.exec(cid, "touch", "/rootfs-file")
    assert touch.exit_code != 0  # type: ignore[attr-defined]
    status = (await pod.exec(cid, "cat", "/proc/self/status")).stdout.decode()  # type: ignore[attr-defined]
    assert re.search(r"CapBnd:\s+0+\n", status), status
    await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))


async def test_containers_share_the_pods_ipc_and_uts_namespaces(
        vm_daemon: Daemon, busybox_ref: str, tmp_path: Path) -> None:
    """A pod's containers share one IPC and one UTS namespace, carrying the pod's hostname and
    its IPC sysctls, and none of them is a container's own."""
    sysctls = {"kernel.shm_rmid_forced": "1", "kernel.msgmax": "4096"}
    async with running_pod(vm_daemon, busybox_ref, "ns-pod", tmp_path, hostname="ns-pod",
                           linux=msg("LinuxPodSandboxConfig", sysctls=sysctls)) as pod:
        first = await pod.container("first", "sleep", "3600")
        second = await pod.container("second", "sleep", "3600")
        seen = []
        for cid in (first, second):
            out = await pod.exec(cid, "sh", "-c",
                                 "for ns in ipc uts mnt; do readlink /proc/self/ns/$ns; done; "
                                 "hostname; "
                                 "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/kernel/msgmax")
            assert out.exit_code == 0, out  # type: ignore[attr-defined]
            seen.append(out.stdout.decode().split())  # type: ignore[attr-defined]
        assert seen[0][:2] == seen[1][:2]  # the pod's IPC and UTS namespaces
        assert seen[0][2] != seen[1][2]  # each container's own mount namespace
        assert seen[0][3:] == seen[1][3:] == ["ns-pod", "1", "4096"]


async def test_pod_network_reaches_container(pod: Pod, tmp_path: Path) -> None:
    status = await pod.cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest",
                                                        pod_sandbox_id=pod.id))
    pod_ip = status.status.network.ip
    assert pod_ip
    server = await pod.container("httpd", "sh", "-c",
                                 "mkdir -p /tmp/www && echo hello-from-pod > /tmp/www/index.html"
                                 " && exec httpd -f -p 8080 -h /tmp/www")
    assert pod_ip in (await pod.exec(server, "ip", "addr")).stdout.decode()  # type: ignore[attr-defined]
    body = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://{pod_ip}:8080/", timeout=3).read())
            break
        except OSError:
            await asyncio.sleep(0.5)
    assert body == b"hello-from-pod\n"  # host -> pod

    other = await _pod(pod.cri, pod.image, "ctr-pod-2", tmp_path)
    try:
        client = await other.container("client", "sleep", "3600")
        fetched = await other.exec(client, "wget", "-q", "-O", "-", f"http://{pod_ip}:8080/")
        assert fetched.stdout == b"hello-from-pod\n"  # pod -> pod  # type: ignore[attr-defined]
    finally:
        await pod.cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=other.id))
        await pod.cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                                   pod_sandbox_id=other.id))
    await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=server))


def _qemu_rss_mib(pod: Pod) -> float:
    [qemu] = vm_pids_of(pod.id)
    status = Path(f"/proc/{qemu}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) / 1024  # type: ignore[index]


async def test_memory_the_guest_frees_returns_to_the_host(pod: Pod) -> None:
    """Free page reporting (virtio-balloon): 80 MiB written into a container's writable layer
    (guest RAM: tmpfs) and deleted again leave QEMU's resident memory."""
    cid = await pod.container("memfree", "sleep", "100000")
    try:
        r = await pod.exec(cid, "sh", "-c", "head -c 83886080 /dev/zero > /fill", timeout=120)
        assert r.exit_code == 0, r  # type: ignore[attr-defined]
        full = _qemu_rss_mib(pod)
        r = await pod.exec(cid, "rm", "/fill")
        assert r.exit_code == 0, r  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while _qemu_rss_mib(pod) > full - 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert _qemu_rss_mib(pod) <= full - 50, (full, _qemu_rss_mib(pod))
    finally:
        await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))


async def test_log_reopen(pod: Pod) -> None:
    cid = await pod.container("ticker", "sh", "-c",
                              "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done")
    log = pod.logs / "ticker.log"
    deadline = time.monotonic() + 30
    while (not log.exists() or b"tick 2" not in log.read_bytes()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    log.rename(log.with_suffix(".log.1"))  # what kubelet's rotation does
    await pod.cri.runtime.ReopenContainerLog(msg("ReopenContainerLogRequest", container_id=cid))
    deadline = time.monotonic() + 30
    while (not log.exists() or b"tick" not in log.read_bytes()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert b"tick" in log.read_bytes()
    await pod.cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))


async def test_guest_panic_is_noticed(pod: Pod, tmp_path: Path) -> None:
    """A guest kernel panic (forced from a privileged container) ends the VM: the pod turns
    NOTREADY with the reason, its containers EXITED."""
    cri = pod.cri
    logs = tmp_path / "panic"
    privileged = msg("LinuxSandboxSecurityContext", privileged=True)
    pod_id = await cri.run_pod("ctr-panic", log_directory=str(logs),
                               linux=msg("LinuxPodSandboxConfig", security_context=privileged))
    victim = Pod(cri, pod_id, "ctr-panic", logs, pod.image)
    cid = await victim.container("panicker", "sleep", "3600", linux=msg(
        "LinuxContainerConfig", security_context=msg("LinuxContainerSecurityContext",
                                                     privileged=True)))
    with pytest.raises(grpc.aio.AioRpcError):  # the VM dies under the call
        await victim.exec(cid, "sh", "-c", "echo c > /proc/sysrq-trigger", timeout=10)
    deadline = time.monotonic() + 10
    info: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest",
                                                   pod_sandbox_id=pod_id, verbose=True))
        info = json.loads(r.info["info"])
        if r.status.state == enum("SANDBOX_NOTREADY"):
            break
        await asyncio.sleep(0.2)
    assert info["reason"] in ("GuestPanicked", "GuestShutdown"), info
    status = await victim.status(cid)
    assert status.state == enum("CONTAINER_EXITED")  # type: ignore[attr-defined]
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))


async def test_host_port_mapping(pod: Pod, tmp_path: Path) -> None:
    """A hostPort reaches the container through the portmap plugin's DNAT."""
    cri = pod.cri
    host_port = 18000 + int(time.time()) % 1000
    mapping = msg("PortMapping", protocol=enum("TCP"), container_port=8080, host_port=host_port)
    pod_id = await cri.run_pod("ctr-hostport", log_directory=str(tmp_path),
                               port_mappings=[mapping])
    served = Pod(cri, pod_id, "ctr-hostport", tmp_path, pod.image)
    try:
        await served.container("httpd", "sh", "-c",
                               "mkdir -p /tmp/www && echo via-host-port > /tmp/www/index.html"
                               " && exec httpd -f -p 8080 -h /tmp/www")
        status = await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest",
                                                        pod_sandbox_id=pod_id))
        # A local address of the host other than loopback: the pod network's gateway.
        gateway = status.status.network.ip.rsplit(".", 1)[0] + ".1"
        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                body = await asyncio.to_thread(lambda: urllib.request.urlopen(
                    f"http://{gateway}:{host_port}/", timeout=3).read())
                break
            except OSError:
                await asyncio.sleep(0.5)
        assert body == b"via-host-port\n"
    finally:
        await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))


async def test_running_container_survives_daemon_restart(pod: Pod, vm_daemon: Daemon) -> None:
    cid = await pod.container("survivor", "sh", "-c",
                              "echo before; read line < /tmp/never 2>/dev/null; sleep 4; "
                              "echo after; exit 5")
    log = pod.logs / "survivor.log"
    deadline = time.monotonic() + 30
    while (not log.exists() or b"before" not in log.read_bytes()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    vm_daemon.stop(signal.SIGKILL)
    vm_daemon.start()
    status = await pod.status(cid)
    assert status.state in (enum("CONTAINER_RUNNING"), enum("CONTAINER_EXITED"))  # type: ignore[attr-defined]
    status = await pod.wait_exit(cid)
    assert status.exit_code == 5  # type: ignore[attr-defined]
    records = [content for stream, _, content in pod.log_records("survivor") if stream == "stdout"]
    assert records.count(b"before") == 1 and records.count(b"after") == 1, records
