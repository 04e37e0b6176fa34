"""The warm pool's file rules: what a crashed daemon's pooled VMs leave goes at the next start,
and a pod's state dir that links to a pooled VM's goes with it."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from criserver.backends.microvm.pool import PooledVM, WarmPool, remove_pod_state_dir
from criserver.vm.template import template_key
from tests.processes import qemu_like
from tests.vm.test_template import pod_spec


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def _pool(state: Path, volumes: Path) -> WarmPool:
    return WarmPool(1, state, volumes, None, None, None, None, 1.0)  # type: ignore[arg-type]


def test_prune_kills_and_removes_only_unlinked_pool_vms(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    state, volumes = tmp_path / "state", tmp_path / "volumes"
    for d in ("pool-aaaa", "pool-bbbb", "0123456789abcdef"):
        (state / d).mkdir(parents=True)
    (state / "fedcba9876543210").symlink_to("pool-bbbb")  # a pod that took pool-bbbb
    (volumes / "pool-aaaa").mkdir(parents=True)
    (volumes / "0123456789abcdef").mkdir()
    orphan = qemu_like(state / "pool-aaaa" / "qemu.pid")
    taken = qemu_like(state / "pool-bbbb" / "qemu.pid")
    procs += [orphan, taken]

    _pool(state, volumes).prune()

    assert orphan.wait(timeout=5) == -9
    assert taken.poll() is None
    assert sorted(p.name for p in state.iterdir()) == [
        "0123456789abcdef", "fedcba9876543210", "pool-bbbb"]
    assert [p.name for p in volumes.iterdir()] == ["0123456789abcdef"]


def test_a_pods_state_dir_goes_with_the_pool_dir_it_links_to(tmp_path: Path) -> None:
    (tmp_path / "pool-cccc").mkdir()
    (tmp_path / "pool-cccc" / "vm.log").write_text("x")
    link = tmp_path / "0123456789abcdef"
    link.symlink_to("pool-cccc")
    remove_pod_state_dir(link)
    assert list(tmp_path.iterdir()) == []
    plain = tmp_path / "fedcba9876543210"
    (plain / "sub").mkdir(parents=True)
    remove_pod_state_dir(plain)
    remove_pod_state_dir(plain)  # gone already: fine
    assert list(tmp_path.iterdir()) == []


@dataclass
class _FakeVM:
    exited: bool = False

    async def kill(self) -> None:
        self.exited = True


async def test_take_gives_a_live_vm_of_the_shape_asked(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "state", tmp_path / "volumes")
    small, big = pod_spec("a"), pod_spec("b", memory_mib=1024)
    dead = PooledVM("pool-dead", template_key(small), small, _FakeVM(exited=True))  # type: ignore[arg-type]
    live = PooledVM("pool-live", template_key(small), small, _FakeVM())  # type: ignore[arg-type]
    pool._ready = [dead, live]
    pool._refill = lambda delay: None  # type: ignore[method-assign]
    assert pool.take(big) is None  # another shape
    assert pool.take(pod_spec("c")) is live  # of the shape, the dead one passed over
    assert pool.ready == 0 and pool.take(small) is None
    await asyncio.sleep(0)  # the dead one's discard ran
