"""Trusted pods under a real kubelet: a hostNetwork static pod runs on runc on the host beside a
micro-VM pod, and kubelet's log rotation (rename + ReopenContainerLog) of a runc container that
prints steadily, across a daemon SIGKILL, keeps every line exactly once (design doc
runc-backend.md, plan step 9)."""

from __future__ import annotations

import gzip
import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cri_client import msg
from tests.daemon import Daemon, process_cmdlines
from tests.e2e.conftest import vm_pids_of
from tests.kubelet.node import (
    BUSYBOX,
    GONE_TIMEOUT,
    START_TIMEOUT,
    KubeletNode,
    all_running,
    assert_no_runtime_errors,
    http_get,
    in_thread,
    pod_manifest,
    remove_and_check_gone,
    running_node,
    runtime_containers,
    runtime_pods,
    sandbox_of,
    statuses,
    wait_for,
)
from tests.registry import free_port

pytestmark = pytest.mark.vm

# kubelet rotates a running container's log when it is over containerLogMaxSize, checking every
# containerLogMonitorInterval (3 s is the least kubelet's validation accepts); it keeps the
# current file and containerLogMaxFiles - 1 rotated ones, gzipping all but the newest rotated.
LOG_MAX_SIZE = "10Ki"
LOG_MAX_FILES = 5
ROTATION = {"containerLogMaxSize": LOG_MAX_SIZE, "containerLogMaxFiles": LOG_MAX_FILES,
            "containerLogMonitorInterval": "3s"}
# `<current>.<YYYYMMDD-HHMMSS>` (kubelet's timestampFormat), `.gz` once compressed.
ROTATED = re.compile(r"\.(\d{8}-\d{6})(\.gz)?$")
CRI_LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) ([PF]) (.*)$")


@pytest.fixture(scope="module")
def node(kubelet: Path, conformance_daemon: Daemon) -> Iterator[KubeletNode]:
    """This module's kubelet rotates container logs small and often."""
    with running_node(conformance_daemon, kubelet, extra_config=ROTATION) as started:
        yield started


def sandbox_info(daemon: Daemon, sandbox_id: str) -> dict[str, Any]:
    """PodSandboxStatus's verbose info, as crictl inspectp shows it."""

    async def status() -> dict[str, Any]:
        cri = daemon.client()
        try:
            reply = await cri.runtime.PodSandboxStatus(
                msg("PodSandboxStatusRequest", pod_sandbox_id=sandbox_id, verbose=True),
                timeout=30)
            return dict(json.loads(reply.info["info"]))
        finally:
            await cri.close()

    return dict(in_thread(status))


def monitors_of(container_ids: set[str]) -> list[int]:
    """Live ctrmon processes serving any of `container_ids` (their bundle is named after it)."""
    return [pid for pid, cmd in process_cmdlines().items()
            if "ctrmon" in cmd and any(cid in cmd for cid in container_ids)]


def remove_host_pod_and_check_gone(node: KubeletNode, name: str, sandbox_id: str) -> None:
    """Remove the manifest: kubelet stops the pod, its monitors end, and kubelet's GC removes
    the sandbox and its containers from criserver."""
    cids = {c.id for c in runtime_containers(node.daemon) if c.pod_sandbox_id == sandbox_id}
    node.remove_manifest(name)
    wait_for(lambda: node.pod(name) is None, 60, f"kubelet to drop pod {name}",
             lambda: node.describe(name))
    wait_for(lambda: not monitors_of(cids), 60, f"the container monitors of pod {name} to end",
             lambda: node.describe(name))
    wait_for(lambda: not [p for p in runtime_pods(node.daemon) if p.id == sandbox_id],
             GONE_TIMEOUT, f"kubelet's GC to remove the sandbox of pod {name}",
             lambda: node.describe(name))
    left = [c for c in runtime_containers(node.daemon) if c.pod_sandbox_id == sandbox_id]
    assert not left, f"containers left of pod {name}: {left}"


def test_host_network_pod_on_runc_beside_a_vm_pod(node: KubeletNode, log_mark: int) -> None:
    """A hostNetwork static pod runs on runc on the host (its httpd answers on the node's
    127.0.0.1), a plain pod on the same node runs in a micro-VM; criserver says which handler
    each got and why."""
    port = free_port()
    node.write_manifest(pod_manifest("hostweb", [
        {"name": "httpd", "image": BUSYBOX,
         "command": ["sh", "-c", "mkdir -p /www && echo served-from-the-host > /www/index.html"
                     f" && exec httpd -f -p 127.0.0.1:{port} -h /www"]},
    ], hostNetwork=True))
    node.write_manifest(pod_manifest("vmpod", [
        {"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]},
    ]))
    node.wait_pod("hostweb", all_running(1), START_TIMEOUT, "httpd running")
    node.wait_pod("vmpod", all_running(1), START_TIMEOUT, "the container running")

    page = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/index.html"), 60,
                    f"the hostNetwork pod's httpd to answer on 127.0.0.1:{port}",
                    lambda: node.describe("hostweb"))
    assert page.strip() == "served-from-the-host"

    host, vm = sandbox_of(node, "hostweb"), sandbox_of(node, "vmpod")
    host_info, vm_info = sandbox_info(node.daemon, host.id), sandbox_info(node.daemon, vm.id)
    assert host.runtime_handler == "runc" and host_info["runtimeHandler"] == "runc", host_info
    assert "host_namespaces_handler" in host_info.get("routedBy", ""), host_info
    assert "network" in host_info["routedBy"], host_info
    assert vm.runtime_handler == "microvm" and vm_info["runtimeHandler"] == "microvm", vm_info
    assert "routedBy" not in vm_info, vm_info
    assert vm_pids_of(host.id) == [], "the hostNetwork pod has a VM"
    assert len(vm_pids_of(vm.id)) == 1, "the plain pod has no VM of its own"

    remove_host_pod_and_check_gone(node, "hostweb", host.id)
    assert http_get(f"http://127.0.0.1:{port}/index.html") is None, "httpd outlived its pod"
    remove_and_check_gone(node, "vmpod", vm.id)
    assert_no_runtime_errors(node, log_mark)


# -- log rotation ----------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The container's retained log, oldest line first, read while nothing moved under it."""

    numbers: list[int]
    rotated: list[str]  # rotated files' names, without `.gz`, oldest first


def read_log_files(directory: Path) -> Snapshot | None:
    """Every number in the rotated files (gzipped or not) and the current `0.log`, in order;
    None when kubelet renamed, compressed or removed a file meanwhile (the caller retries)."""
    before = sorted(p.name for p in directory.iterdir())
    if any(f"{name}.gz" in before or name.endswith(".tmp") for name in before):
        return None  # kubelet is compressing a file: for a moment it is there twice
    rotated = sorted((p for p in before if ROTATED.search(p)), key=lambda p: ROTATED.sub(
        r".\1", p))
    # No current file: between kubelet's rename and the reopen, the newest rotated one grows.
    files = [*rotated, *(["0.log"] if "0.log" in before else [])]
    numbers: list[int] = []
    try:
        for name in files:
            data = (directory / name).read_bytes()
            text = (gzip.decompress(data) if name.endswith(".gz") else data).decode()
            if name == files[-1]:
                text = text[:text.rfind("\n") + 1]  # it may end in half a record
            assert text.endswith("\n") or not text, f"{name} ends in half a record"
            for line in text.splitlines():
                match = CRI_LOG_LINE.match(line)
                assert match and match[2] == "stdout" and match[3] == "F", \
                    f"unexpected record in {name}: {line!r}"
                numbers.append(int(match[4]))
    except FileNotFoundError:
        return None
    if sorted(p.name for p in directory.iterdir()) != before:
        return None
    return Snapshot(numbers, [ROTATED.sub(r".\1", p) for p in rotated])


def assert_each_once(numbers: list[int], where: str) -> None:
    if not numbers:
        return
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected:
        bad = next(i for i, (a, b) in enumerate(zip(numbers, expected, strict=True)) if a != b)
        raise AssertionError(f"{where}: lines not each once in order from {numbers[0]}: at "
                             f"index {bad} got {numbers[max(0, bad - 3):bad + 3]}")


@dataclass
class LogWatch:
    """Reads the container's log files over and over: each read must hold every number once,
    in order; together the reads must cover every number from 1 (a file kubelet deletes was
    read before, as long as reads are more frequent than the retention span)."""

    directory: Path
    seen: set[int] = field(default_factory=set)
    rotations: set[str] = field(default_factory=set)
    reads: int = 0
    last: Snapshot | None = None

    def read(self) -> Snapshot:
        snapshot = wait_for(lambda: read_log_files(self.directory), 10,
                            f"a stable view of {self.directory}", interval=0.05)
        assert_each_once(snapshot.numbers, f"{self.directory} ({snapshot.rotated})")
        self.seen.update(snapshot.numbers)
        self.rotations.update(snapshot.rotated)
        self.reads += 1
        self.last = snapshot
        return snapshot

    def until_rotations(self, count: int, timeout: float) -> Snapshot:
        """Read every 0.3 s until `count` rotations are seen in all."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.read()
            if len(self.rotations) >= count:
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.rotations)} rotations after {timeout:.0f}s, "
                                     f"wanted {count}: {sorted(self.rotations)}")
            time.sleep(0.3)

    def assert_complete(self) -> None:
        top = max(self.seen)
        missing = sorted(set(range(1, top + 1)) - self.seen)
        assert not missing, f"lines never seen in any file: {missing[:20]} ({len(missing)})"


def test_log_rotation_keeps_every_line_once_across_a_daemon_kill(
        node: KubeletNode, log_mark: int) -> None:
    """kubelet rotates the log of a runc container printing numbered lines (rename, then
    ReopenContainerLog); criserver is SIGKILLed and restarted in between while the container
    keeps printing. The retained files always hold each number once in order, every number from
    1 was seen, and rotation works again on the re-adopted container."""
    node.write_manifest(pod_manifest("counter", [
        {"name": "count", "image": BUSYBOX, "command": [
            "sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; usleep 2000; done"]},
    ], hostNetwork=True))
    node.wait_pod("counter", all_running(1), START_TIMEOUT, "the counter running")
    sandbox = sandbox_of(node, "counter")
    assert sandbox.runtime_handler == "runc"
    pattern = f"default_{node.full_name('counter')}_*/count"
    directory = wait_for(lambda: next(iter(node.pod_logs.glob(pattern)), None), 30,
                         f"the container's log directory {pattern}")
    watch = LogWatch(directory)

    watch.until_rotations(3, 60)
    rotations_before = len(watch.rotations)
    assert_no_runtime_errors(node, log_mark)

    daemon = node.daemon
    daemon.stop(signal.SIGKILL)
    killed_at = max(watch.seen)
    time.sleep(4)  # the container keeps printing into its monitor; kubelet's calls fail
    assert max(watch.read().numbers) > killed_at, "nothing logged while the daemon was down"
    daemon.start()
    restart_mark = node.log_lines()
    rotated_before = set(watch.rotations)
    watch.until_rotations(rotations_before + 3, 90)
    time.sleep(1)  # a rotation whose reopen failed is renamed back by now: it must not count
    kept = set(watch.read().rotated) - rotated_before
    assert len(kept) >= 3, f"rotations after the restart that stayed: {sorted(kept)}"

    watch.assert_complete()
    assert max(watch.seen) > killed_at + 1000, "the counter stalled across the restart"
    pod = node.pod("counter")
    assert pod is not None and statuses(pod)["count"]["restartCount"] == 0, pod
    assert sandbox_of(node, "counter").id == sandbox.id
    print(f"rotations seen {len(watch.rotations)} ({rotations_before} before the kill), "
          f"reads {watch.reads}, lines checked 1..{max(watch.seen)}, last read "
          f"{len(watch.last.numbers) if watch.last else 0} lines in "
          f"{len(watch.last.rotated) + 1 if watch.last else 0} files, killed at {killed_at}")

    # While the daemon was down kubelet's calls failed (Unavailable); after it they must not.
    errors = [line for line in node.runtime_errors(restart_mark)
              if "code = Unavailable" not in line]
    assert not errors, "criserver failed kubelet's calls after the restart:\n" + "\n".join(
        errors[:10])
    remove_host_pod_and_check_gone(node, "counter", sandbox.id)
