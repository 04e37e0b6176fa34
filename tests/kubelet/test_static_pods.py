"""Static pods of a real kubelet (no API server) on criserver's micro-VM pods: kubelet reads the
manifests, drives criserver through the CRI, and reports the pods' status on its read-only port.
Every test removes its manifest and checks that kubelet tore the pod down completely."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.conftest import vm_pids_of
from tests.kubelet.node import (
    BUSYBOX,
    NGINX,
    START_TIMEOUT,
    KubeletNode,
    all_running,
    assert_no_runtime_errors,
    http_get,
    pod_manifest,
    remove_and_check_gone,
    runtime_containers,
    sandbox_of,
    statuses,
    wait_for,
)

pytestmark = pytest.mark.vm


def pod_subnet(node: KubeletNode) -> ipaddress.IPv4Network:
    found = re.search(r'default_subnet = "([\d./]+)"', node.daemon.config_path.read_text())
    assert found is not None
    return ipaddress.IPv4Network(found[1])


def test_two_containers_share_an_empty_dir_and_serve_http(node: KubeletNode,
                                                          log_mark: int) -> None:
    """busybox writes the page nginx serves from a shared emptyDir; the pod's IP is on the pod
    network and answers HTTP from the host; removing the manifest removes everything."""
    node.write_manifest(pod_manifest("web", [
        {"name": "writer", "image": BUSYBOX,
         "command": ["sh", "-c", "echo written-by-busybox > /html/index.html; exec sleep 3600"],
         "volumeMounts": [{"name": "html", "mountPath": "/html"}]},
        {"name": "nginx", "image": NGINX, "ports": [{"containerPort": 80}],
         "volumeMounts": [{"name": "html", "mountPath": "/usr/share/nginx/html"}]},
    ], volumes=[{"name": "html", "emptyDir": {}}]))
    pod = node.wait_pod("web", all_running(2), START_TIMEOUT, "both containers running")

    ip = ipaddress.IPv4Address(pod["status"]["podIP"])
    assert ip in pod_subnet(node), f"pod IP {ip} is not on the pod network {pod_subnet(node)}"
    page = wait_for(lambda: http_get(f"http://{ip}/index.html"), 60,
                    f"nginx to answer on http://{ip}/", lambda: node.describe("web"))
    assert page.strip() == "written-by-busybox"

    sandbox = sandbox_of(node, "web")
    assert sandbox.state == 0  # SANDBOX_READY
    containers = {c.metadata.name for c in runtime_containers(node.daemon)
                  if c.pod_sandbox_id == sandbox.id}
    assert containers == {"writer", "nginx"}
    assert len(vm_pids_of(sandbox.id)) == 1

    remove_and_check_gone(node, "web", sandbox.id)
    assert_no_runtime_errors(node, log_mark)


def started_at(state: dict[str, Any], key: str) -> datetime:
    return datetime.fromisoformat(state[key].replace("Z", "+00:00"))


def test_init_container_completes_before_the_app_starts(node: KubeletNode,
                                                        log_mark: int) -> None:
    """The init container runs to completion (exit 0) before kubelet creates the app
    container, which finds the init container's file in the shared emptyDir at its start."""
    node.write_manifest(pod_manifest("init", [
        # `cat` fails, and the container with it, if the init container has not run
        {"name": "app", "image": BUSYBOX,
         "command": ["sh", "-c", "cat /work/ready && exec sleep 3600"],
         "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
    ], initContainers=[
        {"name": "prepare", "image": BUSYBOX,
         "command": ["sh", "-c", "sleep 2; echo prepared-by-init > /work/ready"],
         "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
    ], volumes=[{"name": "work", "emptyDir": {}}]))
    pod = node.wait_pod("init", all_running(1), START_TIMEOUT, "the app container running")

    init = statuses(pod, "initContainerStatuses")["prepare"]
    done = init["state"].get("terminated")
    assert done is not None and done["exitCode"] == 0 and done["reason"] == "Completed", init
    app = statuses(pod)["app"]
    assert app["restartCount"] == 0, app
    # RFC 3339 seconds: the app may start within the second the init container ended
    assert started_at(done, "finishedAt") <= started_at(app["state"]["running"], "startedAt")
    assert "prepared-by-init" in node.container_log("init", "app", "prepared-by-init")

    remove_and_check_gone(node, "init", sandbox_of(node, "init").id)
    assert_no_runtime_errors(node, log_mark)


def test_failing_liveness_probe_restarts_the_container_in_the_same_vm(
        node: KubeletNode, log_mark: int) -> None:
    """An exec liveness probe fails on the first run of the container (its marker file is
    missing), kubelet kills it and creates attempt 1 in the same sandbox and VM; the second
    run is healthy and stays up."""
    script = ("if [ -e /state/started ]; then touch /tmp/healthy; fi; "
              "touch /state/started; exec sleep 3600")
    node.write_manifest(pod_manifest("probe", [
        {"name": "app", "image": BUSYBOX, "command": ["sh", "-c", script],
         "volumeMounts": [{"name": "state", "mountPath": "/state"}],
         "livenessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]},
                           "initialDelaySeconds": 2, "periodSeconds": 3,
                           "failureThreshold": 1, "timeoutSeconds": 30}},
    ], volumes=[{"name": "state", "emptyDir": {}}]))
    node.wait_pod("probe", all_running(1), START_TIMEOUT, "the container running")
    sandbox = sandbox_of(node, "probe")
    vms = vm_pids_of(sandbox.id)
    assert len(vms) == 1

    pod = node.wait_pod(
        "probe", lambda p: all_running(1)(p) and statuses(p)["app"]["restartCount"] >= 1,
        START_TIMEOUT, "the container restarted by its liveness probe, running again")
    app = statuses(pod)["app"]
    assert app["lastState"]["terminated"]["exitCode"] != 0, app
    assert sandbox_of(node, "probe").id == sandbox.id, "kubelet made a new sandbox"
    assert vm_pids_of(sandbox.id) == vms, "the pod's VM changed"
    attempts = sorted(c.metadata.attempt for c in runtime_containers(node.daemon)
                      if c.pod_sandbox_id == sandbox.id and c.metadata.name == "app")
    assert 1 in attempts, f"container attempts in the sandbox: {attempts}"

    remove_and_check_gone(node, "probe", sandbox.id)
    assert_no_runtime_errors(node, log_mark)


def test_post_start_hook_and_readiness_probe_run_through_exec_sync(
        node: KubeletNode, log_mark: int) -> None:
    """kubelet runs a postStart exec hook and an exec readiness probe with ExecSync: the probe
    passes only once the hook has written its file, so a Ready container shows both ran in it."""
    node.write_manifest(pod_manifest("ready", [
        {"name": "app", "image": BUSYBOX, "command": ["sleep", "3600"],
         "lifecycle": {"postStart": {"exec": {
             "command": ["sh", "-c", "echo hooked > /tmp/post-start"]}}},
         "readinessProbe": {"exec": {"command": ["grep", "-q", "hooked", "/tmp/post-start"]},
                            "periodSeconds": 2, "timeoutSeconds": 30}},
    ]))
    pod = node.wait_pod("ready", all_running(1), START_TIMEOUT,
                        "the container ready by its exec probe")
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    assert conditions.get("Ready") == "True", conditions
    assert statuses(pod)["app"]["restartCount"] == 0

    remove_and_check_gone(node, "ready", sandbox_of(node, "ready").id)
    assert_no_runtime_errors(node, log_mark)


def test_restart_policies_never_and_on_failure(node: KubeletNode, log_mark: int) -> None:
    """restartPolicy Never: a failed container stays failed (pod Failed, no restart).
    OnFailure: a failed container is restarted, and one that succeeds is not (pod Succeeded)."""
    node.write_manifest(pod_manifest("never", [
        {"name": "app", "image": BUSYBOX, "command": ["sh", "-c", "exit 3"]},
    ], restartPolicy="Never"))
    # Fails on its first run (no marker in the emptyDir yet), succeeds on the second.
    node.write_manifest(pod_manifest("onfailure", [
        {"name": "app", "image": BUSYBOX,
         "command": ["sh", "-c", "[ -e /state/ran ] && exit 0; touch /state/ran; exit 4"],
         "volumeMounts": [{"name": "state", "mountPath": "/state"}]},
    ], restartPolicy="OnFailure", volumes=[{"name": "state", "emptyDir": {}}]))

    never = node.wait_pod("never", lambda p: p.get("status", {}).get("phase") == "Failed",
                          START_TIMEOUT, "phase Failed")
    app = statuses(never)["app"]
    assert app["restartCount"] == 0 and app["state"]["terminated"]["exitCode"] == 3, app
    on_failure = node.wait_pod(
        "onfailure", lambda p: p.get("status", {}).get("phase") == "Succeeded",
        START_TIMEOUT, "phase Succeeded after one restart")
    app = statuses(on_failure)["app"]
    assert app["restartCount"] == 1, app
    assert app["state"]["terminated"]["exitCode"] == 0, app
    assert app["lastState"]["terminated"]["exitCode"] == 4, app

    for name in ("never", "onfailure"):
        remove_and_check_gone(node, name, sandbox_of(node, name).id)
    assert_no_runtime_errors(node, log_mark)
