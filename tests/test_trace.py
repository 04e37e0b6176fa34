"""The trace mode (issue 16): the step recorder (vmagent.steps, criserver.trace), the one
`trace rpc=...` line per traced lifecycle call, and nothing when tracing is off."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from criserver import instrument
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.trace import TRACED, timed_entry, traced
from tests.daemon import INERT_CONFIG, Daemon
from vmagent.steps import Steps, current, recording, span


def test_span_without_recorder_is_a_shared_noop() -> None:
    assert current() is None
    assert span("a") is span("b")
    with span("a"):
        pass


def test_spans_add_up_per_name_in_first_seen_order() -> None:
    with recording(Steps()) as steps:
        for name in ("b", "a", "b"):
            with span(name):
                pass
        with pytest.raises(ValueError), span("failed"):
            raise ValueError  # the time of a failed step counts too
    assert list(steps.ms) == ["b", "a", "failed"]
    assert all(ms >= 0 for ms in steps.ms.values())
    assert current() is None


async def test_tasks_of_a_call_record_only_while_it_runs() -> None:
    release = asyncio.Event()

    async def background() -> None:
        with span("inside"):
            await asyncio.sleep(0)
        await release.wait()
        assert current() is None  # the call ended: no recorder any more
        with span("after"):
            pass

    with recording(Steps()) as steps:
        task = asyncio.create_task(background())
        await asyncio.sleep(0.01)
    release.set()
    await task
    assert list(steps.ms) == ["inside"]


def test_encode_decode_and_untrusted_headers() -> None:
    steps = Steps()
    steps.add("runc_create", 312.345)
    steps.add("rootfs", 4)
    assert steps.encode() == "runc_create=312.35,rootfs=4.00"
    assert Steps.decode(steps.encode()) == {"runc_create": 312.35, "rootfs": 4.0}
    assert Steps.decode("") == {}
    assert Steps.decode("x=nan,y=-1,z=abc,a b=1,=2,ok=1.5," + "n" * 60 + "=1") == {"ok": 1.5}
    assert len(Steps.decode(",".join(f"s{i}=1" for i in range(100)))) == 32


async def test_timed_entry_times_the_wait_and_is_the_lock_itself_when_off() -> None:
    lock = asyncio.Lock()
    assert timed_entry("lock", lock) is lock
    with recording(Steps()) as steps:
        await lock.acquire()
        asyncio.get_running_loop().call_later(0.05, lock.release)
        async with timed_entry("lock", lock):
            pass
    assert steps.ms["lock"] >= 40
    assert not lock.locked()


async def test_traced_logs_one_line_with_steps_failed_or_not(
        caplog: pytest.LogCaptureFixture) -> None:
    async def work(fail: bool) -> str:
        with span("agent.CreateContainer"):
            await asyncio.sleep(0)
        if fail:
            raise RuntimeError("boom")
        return "done"

    caplog.set_level(logging.INFO, "criserver.trace")
    assert await traced("CreateContainer", " pod=p1", work(False)) == "done"
    with pytest.raises(RuntimeError):
        await traced("CreateContainer", " pod=p1", work(True))
    lines = [r.getMessage() for r in caplog.records if r.name == "criserver.trace"]
    assert len(lines) == 2
    assert lines[0].startswith("trace rpc=CreateContainer pod=p1 code=OK total_ms=")
    assert " agent.CreateContainer=" in lines[0]
    assert " code=RuntimeError " in lines[1]


class _Context:
    def time_remaining(self) -> float | None:
        return None


@pytest.mark.parametrize("on", [True, False])
async def test_rpc_layer_traces_only_when_asked(on: bool,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async def stop(request: Any) -> cri.StopContainerResponse:
        with span("agent.SignalContainer"):
            pass
        return cri.StopContainerResponse()

    caplog.set_level(logging.INFO)
    handle = instrument._unary("StopContainer", stop, traced=on)
    await handle(cri.StopContainerRequest(container_id="c1"), _Context())
    lines = [r.getMessage() for r in caplog.records if r.name == "criserver.trace"]
    assert len(lines) == (1 if on else 0)
    if on:
        assert lines[0].startswith("trace rpc=StopContainer container=c1 code=OK total_ms=")


async def _lifecycle(daemon: Daemon) -> None:
    cri_client = daemon.client()
    try:
        pod = await cri_client.run_pod("traced")
        container = await cri_client.create_container(pod, "c")
        rt = cri_client.runtime
        await rt.StartContainer(cri.StartContainerRequest(container_id=container))
        await rt.StopContainer(cri.StopContainerRequest(container_id=container))
        await rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container))
        await rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        await rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        await rt.ListContainers(cri.ListContainersRequest())
    finally:
        await cri_client.close()


@pytest.mark.parametrize("on", [True, False])
async def test_daemon_traces_the_lifecycle_calls_when_configured(tmp_path: Path,
                                                                 on: bool) -> None:
    # Lines right after the [daemon] table's own keys belong to it.
    daemon = Daemon(tmp_path, config=("trace = true\n" if on else "") + INERT_CONFIG).start()
    try:
        await _lifecycle(daemon)
    finally:
        daemon.kill()
    traced_rpcs = [line.split("trace rpc=")[1].split()[0] for line in daemon.log().splitlines()
                   if "trace rpc=" in line]
    if not on:
        assert traced_rpcs == []
        return
    assert set(traced_rpcs) == TRACED  # ListContainers is not traced
    create = next(line for line in daemon.log().splitlines() if "trace rpc=CreateContainer" in line)
    assert " lock=" in create and " db_write=" in create
