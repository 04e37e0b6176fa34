"""What critest checks of privileged containers and read-only volumes, on real micro-VMs:
`brctl addbr` (a kernel module loaded on demand in the guest) with privileges or CAP_NET_ADMIN
only, the guest's devices in privileged containers, and read-only mounts that are (or are not)
recursive over a tmpfs mounted below the volume on the host."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.cri_client import enum, msg
from tests.daemon import Daemon
from tests.e2e.test_containers_vm import Pod, running_pod

pytestmark = pytest.mark.vm

PRIVILEGED_POD = msg("LinuxPodSandboxConfig", security_context=msg(
    "LinuxSandboxSecurityContext", privileged=True))


@pytest.fixture(scope="module")
async def privileged_pod(vm_daemon: Daemon, busybox_ref: str,
                         tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    async with running_pod(vm_daemon, busybox_ref, "priv-pod", tmp_path_factory.mktemp("logs"),
                           linux=PRIVILEGED_POD) as pod:
        yield pod


def security(**fields: object) -> object:
    return msg("LinuxContainerConfig", security_context=msg("LinuxContainerSecurityContext",
                                                             **fields))


async def test_privileged_container_manages_the_network_and_sees_devices(
        privileged_pod: Pod) -> None:
    pod = privileged_pod
    cid = await pod.container("privileged", "sleep", "3600", linux=security(privileged=True))
    t0 = time.monotonic()
    r = await pod.exec(cid, "brctl", "addbr", "foobar")  # critest checkNetworkManagement
    print(f"brctl addbr with the bridge module loaded on demand: {time.monotonic() - t0:.2f} s")
    assert r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
    r = await pod.exec(cid, "sh", "-c", "grep -w bridge /proc/modules && test -b /dev/vda && "
                       "test -c /dev/loop-control && test -e /dev/vport*p1")
    assert r.exit_code == 0, (r.stdout, r.stderr)  # type: ignore[attr-defined]
    plain = await pod.container("plain", "sleep", "3600")
    r = await pod.exec(plain, "sh", "-c", "test -e /dev/vda || test -e /dev/loop-control")
    assert r.exit_code != 0  # type: ignore[attr-defined]  # only privileged ones get them


async def test_net_admin_alone_manages_the_network(privileged_pod: Pod) -> None:
    pod = privileged_pod
    admin = await pod.container("net-admin", "sleep", "3600", linux=security(
        capabilities=msg("Capability", add_capabilities=["NET_ADMIN"])))
    r = await pod.exec(admin, "brctl", "addbr", "foobar2")
    assert r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
    default = await pod.container("default-caps", "sleep", "3600")
    r = await pod.exec(default, "brctl", "addbr", "foobar3")
    assert r.exit_code != 0  # type: ignore[attr-defined]


@pytest.fixture
def host_path(tmp_path: Path) -> Iterator[Path]:
    """critest's createHostPathForRROMount: a directory with a tmpfs mounted on `tmpfs`."""
    (tmp_path / "tmpfs").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tmp_path / "tmpfs")], check=True)
    yield tmp_path
    subprocess.run(["umount", "-l", str(tmp_path / "tmpfs")], check=False)


async def test_readonly_mounts_recursive_or_not(privileged_pod: Pod, host_path: Path) -> None:
    pod = privileged_pod
    mounts = [msg("Mount", container_path="/mnt", host_path=str(host_path), readonly=True,
                  selinux_relabel=True),
              msg("Mount", container_path="/rro", host_path=str(host_path), readonly=True,
                  recursive_read_only=True, selinux_relabel=True)]
    cid = await pod.container("readonly", "sleep", "3600", mounts=mounts)
    # critest "should support non-recursive readonly mounts"
    r = await pod.exec(cid, "touch", "/mnt/tmpfs/file")
    assert r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
    assert (host_path / "tmpfs/file").exists()
    r = await pod.exec(cid, "touch", "/mnt/top")
    assert b"Read-only file system" in r.stderr  # type: ignore[attr-defined]
    # critest "should support recursive readonly mounts"
    r = await pod.exec(cid, "sh", "-c",
                       'touch /rro/tmpfs/foo 2>&1 | grep -q "Read-only file system"')
    assert r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
    assert not (host_path / "tmpfs/foo").exists()
    # The guest cannot undo it: the host's bind is read-only too.
    r = await pod.exec(cid, "sh", "-c", "mount -o remount,rw /rro && touch /rro/tmpfs/bar")
    assert not (host_path / "tmpfs/bar").exists()
    # critest's clean-up, while the container runs: the host unmounts its tmpfs and removes
    # the directory, which no copy of criserver's may pin.
    subprocess.run(["umount", "-l", str(host_path / "tmpfs")], check=True)
    (host_path / "tmpfs").rmdir()


@pytest.mark.parametrize("fields", [
    {"readonly": True, "propagation": enum("PROPAGATION_HOST_TO_CONTAINER")},
    {"readonly": True, "propagation": enum("PROPAGATION_BIDIRECTIONAL")},
    {"readonly": False},
])
async def test_recursive_readonly_refuses_what_the_cri_forbids(
        privileged_pod: Pod, host_path: Path, fields: dict[str, object]) -> None:
    mount = msg("Mount", container_path="/mnt", host_path=str(host_path),
                recursive_read_only=True, selinux_relabel=True, **fields)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await privileged_pod.container("bad-rro", "sleep", "3600", mounts=[mount])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
