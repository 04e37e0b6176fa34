"""A micro-VM pod's life on a real kubelet beyond start-up: a memory limit in the manifest is
the container's limit in the VM and exceeding it ends in OOMKilled; the criserver daemon
restarted (SIGTERM, then SIGKILL) under kubelet leaves the pods running untouched; a deleted
manifest leaves nothing on the host, and kubelet's image GC removes the image no pod uses."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import network_names, vm_pids_of
from tests.kubelet.node import (
    BUSYBOX,
    NGINX,
    START_TIMEOUT,
    KubeletNode,
    all_running,
    assert_no_runtime_errors,
    klog_time,
    pod_manifest,
    remove_and_check_gone,
    runtime_containers,
    runtime_images,
    sandbox_of,
    statuses,
    wait_for,
)

pytestmark = pytest.mark.vm

MEMORY_LIMIT = 64 * 1024 * 1024


def test_memory_limit_reaches_the_vm_and_oom_kills_the_container(
        node: KubeletNode, log_mark: int) -> None:
    """A 64Mi limit is the container's cgroup limit in the guest (it prints memory.max), and a
    128M allocation gets the container OOM-killed: kubelet reports reason OOMKilled."""
    node.write_manifest(pod_manifest("hog", [
        {"name": "hog", "image": BUSYBOX, "command": [
            "sh", "-c", "cat /sys/fs/cgroup/memory.max; "
            "exec dd if=/dev/zero of=/dev/null bs=128M count=1"],
         "resources": {"limits": {"memory": "64Mi"}}},
    ], restartPolicy="Never"))
    pod = node.wait_pod("hog", lambda p: p.get("status", {}).get("phase") == "Failed",
                        START_TIMEOUT, "phase Failed")
    text = node.container_log("hog", "hog", f" {MEMORY_LIMIT}\n")
    hog = statuses(pod)["hog"]
    ended = hog["state"].get("terminated")
    assert ended is not None and ended["reason"] == "OOMKilled", (hog, text)
    assert ended["exitCode"] == 128 + signal.SIGKILL, hog
    assert hog["restartCount"] == 0, hog
    assert f" {MEMORY_LIMIT}\n" in text, f"memory.max in the guest is not the limit: {text!r}"

    remove_and_check_gone(node, "hog", sandbox_of(node, "hog").id)
    assert_no_runtime_errors(node, log_mark)


# -- the daemon restarted under kubelet ------------------------------------------------------

# kubelet's CRI client redials with a backoff of at most 3 s (k8s.io/cri-client), 3.6 s with
# gRPC's jitter: its calls may fail Unavailable that long after the daemon listens again; the
# rest is slack for a loaded host.
REDIAL = 5.0
# kubelet's errors that are about the runtime: failed CRI calls and what it derives from them.
ABOUT_RUNTIME = re.compile(r"rpc error|container runtime|PLEG")


def unexplained_errors(node: KubeletNode, since: int, back_at: float) -> list[str]:
    """kubelet's errors about the runtime after line `since` that an outage ending at `back_at`
    does not explain: only Unavailable (connection refused, or a call cut by the kill) until
    kubelet has redialled, and, as at any time, NotFound/Canceled (see `runtime_errors`)."""
    unexplained = []
    for line in node.error_lines(since):
        if not ABOUT_RUNTIME.search(line) or re.search(r"code = (NotFound|Canceled)\b", line):
            continue
        logged = klog_time(line)
        if "code = Unavailable" in line and logged is not None and logged <= back_at + REDIAL:
            continue
        unexplained.append(line)
    return unexplained


def test_daemon_restarts_under_kubelet_leave_the_pods_running(
        node: KubeletNode, log_mark: int) -> None:
    """The daemon stopped with SIGTERM, then killed with SIGKILL, each time down for a few of
    kubelet's relists, status checks and probes: the pod's VM is the same QEMU process, kubelet
    sees the same container (ID, start time, no restart), the exec readiness probe passes again,
    and kubelet logs nothing about the runtime beyond the outage's connection errors."""
    node.write_manifest(pod_manifest("steady", [
        {"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"],
         "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 2,
                            "timeoutSeconds": 30}},
    ]))
    before = statuses(node.wait_pod("steady", all_running(1), START_TIMEOUT,
                                    "the container running and ready"))["app"]
    sandbox = sandbox_of(node, "steady")
    vms = vm_pids_of(sandbox.id)
    assert len(vms) == 1
    containers = {c.id for c in runtime_containers(node.daemon)
                  if c.pod_sandbox_id == sandbox.id}
    daemon = node.daemon
    assert_no_runtime_errors(node, log_mark)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        mark = node.log_lines()
        old_pid = daemon.pid
        daemon.stop(sig)
        time.sleep(5)  # relists (1 s), Status (5 s) and the probe (2 s) fail meanwhile
        daemon.start()
        back_at = time.time()
        assert daemon.pid != old_pid
        outage = node.error_lines(mark)
        assert any("code = Unavailable" in line for line in outage), \
            f"kubelet did not notice the daemon was down ({sig.name})"

        time.sleep(REDIAL + 8)  # relists, Status checks and probes on the restarted daemon
        pod = node.wait_pod("steady", all_running(1), 60, f"ready after the {sig.name} restart")
        after = statuses(pod)["app"]
        assert after["containerID"] == before["containerID"], (sig.name, before, after)
        assert after["restartCount"] == 0, (sig.name, after)
        assert after["state"]["running"]["startedAt"] == before["state"]["running"]["startedAt"]
        assert vm_pids_of(sandbox.id) == vms, f"the pod's VM changed ({sig.name})"
        assert sandbox_of(node, "steady").id == sandbox.id
        assert {c.id for c in runtime_containers(daemon)
                if c.pod_sandbox_id == sandbox.id} == containers
        unexplained = unexplained_errors(node, mark, back_at)
        assert not unexplained, (f"kubelet's errors about the runtime across the {sig.name} "
                                 "restart:\n" + "\n".join(unexplained[:10]))

    settled = node.log_lines()
    remove_and_check_gone(node, "steady", sandbox.id)
    assert_no_runtime_errors(node, settled)


# -- teardown and image GC -------------------------------------------------------------------

# kubelet's image GC, made to run within seconds (pkg/kubelet/images/image_gc_manager.go,
# pkg/kubelet/eviction/): its periodic run (at start, then every 5 min) cannot delete on its
# first pass (an image first seen by that pass is younger than any imageMinimumGCAge, and 0
# means the default 2 min), so the test sets the image filesystem (ImageFsInfo's mountpoint)
# under pressure instead: every 10 s the eviction manager asks the image GC to free what no
# container uses and is at least 1 ns old. It then finds only static pods to evict, which are
# critical: it evicts none (and logs so).
IMAGE_GC_NOW = {"imageMinimumGCAge": "1ns",
                "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                                 "imagefs.available": "99%", "nodefs.inodesFree": "1%"}}


def cgroup_dirs_named(needle: str, depth: int = 4) -> list[str]:
    """Directories of the host's cgroup trees whose name holds `needle`."""
    found: list[str] = []
    level = [Path("/sys/fs/cgroup")]
    for _ in range(depth):
        deeper = []
        for directory in level:
            try:
                children = [c for c in directory.iterdir() if c.is_dir() and not c.is_symlink()]
            except OSError:
                continue
            found += [str(c) for c in children if needle in c.name]
            deeper += children
        level = deeper
    return found


def pod_leftovers(node: KubeletNode, sandbox_id: str, ip: str) -> list[str]:
    """What of the pod is on the host: its QEMU, its files (netns, state, volumes) in the
    daemon's dirs, its mounts, its IP's CNI allocation, cgroups named after it."""
    daemon = node.daemon
    found = [f"qemu pid {pid}" for pid in vm_pids_of(sandbox_id)]
    for base in (daemon.state, daemon.root):
        found += [str(p) for p in base.rglob(f"*{sandbox_id}*")]
    found += [f"mount {line}" for line in Path("/proc/mounts").read_text().splitlines()
              if sandbox_id in line]
    allocation = Path("/var/lib/cni/networks") / network_names(daemon)[0] / ip
    found += [f"CNI allocation {allocation}"] if allocation.exists() else []
    found += [f"cgroup {c}" for c in cgroup_dirs_named(sandbox_id[:12])]
    return found


def image_tags(node: KubeletNode) -> set[str]:
    return {tag for image in runtime_images(node.daemon) for tag in image.repo_tags}


def test_deleted_manifest_leaves_nothing_and_image_gc_removes_the_unused_image(
        node: KubeletNode, log_mark: int) -> None:
    """Two pods, on busybox and on nginx. The nginx pod's manifest deleted: its VM, netns,
    IP, files, mounts all go. Then kubelet restarted with its image filesystem under pressure:
    its image GC removes nginx (no container uses it) through criserver, and keeps busybox (the
    other pod runs it, on undisturbed)."""
    node.write_manifest(pod_manifest("keeper", [
        {"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]},
    ]))
    node.write_manifest(pod_manifest("doomed", [{"name": "web", "image": NGINX}]))
    keeper = statuses(node.wait_pod("keeper", all_running(1), START_TIMEOUT,
                                    "the container running"))["app"]
    doomed_pod = node.wait_pod("doomed", all_running(1), START_TIMEOUT, "nginx running")
    doomed, ip = sandbox_of(node, "doomed"), doomed_pod["status"]["podIP"]
    live = pod_leftovers(node, doomed.id, ip)
    for what in ("qemu pid", "/netns/", "mount ", "CNI allocation"):
        assert any(what in item for item in live), f"no {what!r} seen of a live pod: {live}"

    remove_and_check_gone(node, "doomed", doomed.id)
    left = wait_for(lambda: not pod_leftovers(node, doomed.id, ip), 30,
                    "nothing of the deleted pod left on the host",
                    lambda: "\n".join(pod_leftovers(node, doomed.id, ip)))
    assert left
    assert {BUSYBOX, NGINX} <= image_tags(node)

    node.restart(IMAGE_GC_NOW)
    try:
        wait_for(lambda: NGINX not in image_tags(node), 90,
                 "kubelet's image GC to remove the unused image",
                 lambda: f"images: {sorted(image_tags(node))}\n{node.describe()}")
        assert BUSYBOX in image_tags(node), "image GC removed the image a pod runs on"
        assert "Removing image to free bytes" in node.log()
    finally:
        node.restart({})  # no image GC for the module's other tests
    pod = node.wait_pod("keeper", all_running(1), 60, "still running after kubelet restarts")
    after = statuses(pod)["app"]
    assert (after["containerID"], after["restartCount"]) == (keeper["containerID"], 0), after

    remove_and_check_gone(node, "keeper", sandbox_of(node, "keeper").id)
    assert_no_runtime_errors(node, log_mark)
