"""The exit codes criserver decides when no process reported its own, through the CRI calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.runtime import exit_codes
from criserver.runtime.runtime import BackendEventSink
from criserver.store.records import ContainerExit, ContainerState
from tests.runtime.inprocess import in_process


async def test_a_stop_without_a_reported_exit_is_a_kill(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        await p.start(cid)
        p.backend.exit_on_stop = None
        await p.stop(cid)
        c = p.container(cid)
        assert (c.state, c.exit_code, c.reason) == (ContainerState.EXITED, 137, "Error")
        assert c.message == "stopped; no exit status reported"


async def test_a_reported_exit_wins_over_the_stop_rule(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        await p.start(cid)
        p.backend.exit_on_stop = ContainerExit(143, "Error", "", 7)
        await p.stop(cid)
        assert (p.container(cid).exit_code, p.container(cid).finished_at) == (143, 7)


async def test_stopping_the_pod_kills_its_containers(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        pod = await p.run_pod()
        running, created = await p.create(pod, "a"), await p.create(pod, "b")
        await p.start(running)
        await p.stop_pod(pod)
        for cid in (running, created):
            c = p.container(cid)
            assert (c.state, c.exit_code, c.message) == (
                ContainerState.EXITED, 137, "pod sandbox stopped")


async def test_a_failed_start_is_start_error(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        cid = await p.create(await p.run_pod())
        p.backend.start_error = RuntimeError("no such binary")
        with pytest.raises(RuntimeError):
            await p.start(cid)
        c = p.container(cid)
        assert (c.state, c.exit_code, c.reason, c.message) == (
            ContainerState.EXITED, 128, "StartError", "no such binary")


async def test_a_dead_sandbox_loses_its_containers(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        pod = await p.run_pod()
        cid = await p.create(pod)
        await p.start(cid)
        await BackendEventSink(p.rt).sandbox_exited(pod, "VMExited", "qemu died")
        c = p.container(cid)
        assert (c.exit_code, c.reason, c.message) == (255, "VMExited", "qemu died")
        assert p.rt.pods.get(pod).reason == "VMExited"


def test_the_codes_are_what_shells_and_runc_report() -> None:
    assert exit_codes.KILLED == 128 + 9 and exit_codes.LOST == 255
    assert exit_codes.start_failed(OSError("x")) == ContainerExit(128, "StartError", "x")
