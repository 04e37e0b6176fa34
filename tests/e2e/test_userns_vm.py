"""Pods in a user namespace of their own on real micro-VMs, as critest's UserNamespaces specs
check them: the mapping the container sees, a rootfs its mapped root owns, one user namespace
for all the pod's containers, NODE mode, and the refused configurations."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.cri_client import CRIClient, msg
from tests.daemon import Daemon
from tests.e2e.test_containers_vm import Pod

pytestmark = pytest.mark.vm


def userns(mode: str, *mappings: tuple[int, int, int]) -> object:
    ids = [msg("IDMapping", container_id=c, host_id=h, length=n) for c, h, n in mappings]
    options = msg("NamespaceOption", userns_options=msg("UserNamespace", mode=mode, uids=ids,
                                                         gids=ids))
    return options


def linux_pod(options: object) -> object:
    return msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", namespace_options=options))


def linux_container(options: object) -> object:
    return msg("LinuxContainerConfig", security_context=msg(
        "LinuxContainerSecurityContext", namespace_options=options))


@pytest.fixture(scope="module")
async def cri(vm_daemon: Daemon, busybox_ref: str) -> AsyncIterator[CRIClient]:
    client = vm_daemon.client()
    await client.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec",
                                                                    image=busybox_ref)))
    yield client
    await client.close()


async def _pod(cri: CRIClient, name: str, options: object, image: str, tmp: Path) -> Pod:
    pod_id = await cri.run_pod(name, log_directory=str(tmp), linux=linux_pod(options))
    return Pod(cri, pod_id, name, tmp, image)


async def _remove(pod: Pod) -> None:
    await pod.cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod.id))
    await pod.cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest",
                                               pod_sandbox_id=pod.id))


def _stdout(pod: Pod, name: str) -> str:
    return b"\n".join(line for stream, _, line in pod.log_records(name)
                      if stream == "stdout").decode()


async def test_status_advertises_user_namespaces(cri: CRIClient) -> None:
    status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
    assert all(h.features.user_namespaces for h in status.runtime_handlers)


async def test_pod_mode_maps_the_pod_and_its_rootfs(cri: CRIClient, busybox_ref: str,
                                                    tmp_path: Path) -> None:
    options = userns("POD", (0, 1000, 100000))
    pod = await _pod(cri, "userns-pod", options, busybox_ref, tmp_path)
    try:
        # critest: the container prints its uid_map.
        cid = await pod.container("uidmap", "cat", "/proc/self/uid_map",
                                  linux=linux_container(options))
        assert (await pod.wait_exit(cid)).exit_code == 0  # type: ignore[attr-defined]
        assert re.search(r"\s+0\s+1000\s+100000\n?", _stdout(pod, "uidmap"))
        # The image's files are root's, and the mapped root writes where root may.
        probe = ("readlink /proc/self/ns/user; stat -c %u:%g /bin/busybox / /etc; "
                 "touch /etc/new && stat -c %u:%g /etc/new && id -u && ls /sys/class/net")
        first = await pod.container("first", "sh", "-c", probe, linux=linux_container(options))
        assert (await pod.wait_exit(first)).exit_code == 0, pod.log_records("first")  # type: ignore[attr-defined]
        lines = _stdout(pod, "first").splitlines()
        assert lines[1:6] == ["0:0", "0:0", "0:0", "0:0", "0"], lines
        assert "eth0" in lines[6:] or "lo" in lines[6:], lines
        # Containers of the pod share one user namespace; exec goes into it too.
        sleeper = await pod.container("sleeper", "sleep", "3600", linux=linux_container(options))
        r = await pod.exec(sleeper, "sh", "-c",
                           "readlink /proc/self/ns/user; cat /proc/self/uid_map")
        assert r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
        out = r.stdout.decode().splitlines()  # type: ignore[attr-defined]
        assert out[0] == lines[0]
        assert out[1].split() == ["0", "1000", "100000"]
    finally:
        await _remove(pod)


async def test_node_mode_is_the_guest_user_namespace(cri: CRIClient, busybox_ref: str,
                                                     tmp_path: Path) -> None:
    options = msg("NamespaceOption", userns_options=msg("UserNamespace", mode="NODE"))
    pod = await _pod(cri, "userns-node", options, busybox_ref, tmp_path)
    try:
        cid = await pod.container("uidmap", "cat", "/proc/self/uid_map",
                                  linux=linux_container(options))
        assert (await pod.wait_exit(cid)).exit_code == 0  # type: ignore[attr-defined]
        # critest compares with its own (the host's initial) user namespace.
        assert _stdout(pod, "uidmap").split() == ["0", "0", "4294967295"]
    finally:
        await _remove(pod)


@pytest.mark.parametrize("options", [
    userns("POD", (0, 1000, 100000), (0, 2000, 100000)),
    userns("POD", (1, 1000, 100000)),
    msg("NamespaceOption", userns_options=msg("UserNamespace", mode="CONTAINER")),
    msg("NamespaceOption", userns_options=msg("UserNamespace", mode="TARGET")),
], ids=["two-mappings", "root-unmapped", "container", "target"])
async def test_refused_configurations(cri: CRIClient, options: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("userns-bad", linux=linux_pod(options))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
