"""Churn and load on a real micro-VM daemon (issue 18, step 5), shared by the CI test
(tests/e2e/test_churn_vm.py) and the long run by hand (bench/churn.py).

Pods with a container each are made and removed in cycles, a few at a time, while clients
call the list and status RPCs kubelet calls all the time (its PLEG relists every second). The
daemon's own footprint (Status verbose `daemon`: RSS, open fds, threads, asyncio tasks) is read
before and after; the read calls' latencies are kept per RPC. With `wedged`, one more pod's
QEMU is stopped (SIGSTOP) throughout: its guest answers nothing, and calls that need it must
time out alone while everyone else's go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.cri_client import CRIClient, msg
from tests.daemon import Daemon
from tests.e2e.conftest import vm_pids_of

READ_TIMEOUT = 10.0  # a read call slower than this fails the run
READ_CALLS = ("ListPodSandbox", "ListContainers", "PodSandboxStatus", "ContainerStatus",
              "ListContainerStats")


@dataclass
class ChurnResult:
    cycles: int
    seconds: float
    before: dict[str, int]
    after: dict[str, int]
    latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds, per RPC
    wedged_exec: str = ""  # how an exec into the wedged pod ended
    files_before: list[str] = field(default_factory=list)
    files_after: list[str] = field(default_factory=list)

    def new_files(self) -> list[str]:
        left = list(self.files_before)
        extra = []
        for f in self.files_after:
            if f in left:
                left.remove(f)
            else:
                extra.append(f)
        return extra


async def daemon_facts(cri: CRIClient) -> dict[str, int]:
    status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
    return dict(json.loads(status.info["daemon"]))


def open_files(pid: int) -> list[str]:
    """What the daemon's fds point at (to name what a leak leaked)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            found.append(os.readlink(fd))
    return sorted(found)


async def settled_facts(cri: CRIClient, seconds: float = 3.0) -> dict[str, int]:
    """The footprint once the daemon's background work (log pumps, removals) is done: the
    lowest task count seen over `seconds`."""
    best = await daemon_facts(cri)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        facts = await daemon_facts(cri)
        if facts["asyncioTasks"] <= best["asyncioTasks"]:
            best = facts
    return best


async def _pod_with_container(cri: CRIClient, name: str, image: str) -> tuple[str, str]:
    pod_id = await cri.run_pod(name)
    ctr_id = await cri.create_container(pod_id, "app", pod_name=name, image=image,
                                        command=["sleep", "3600"])
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=ctr_id))
    return pod_id, ctr_id


async def _remove(cri: CRIClient, pod_id: str) -> None:
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))


async def _reader(daemon: Daemon, pod_id: str, ctr_id: str, stop: asyncio.Event,
                  latencies: dict[str, list[float]]) -> None:
    """One client calling the read RPCs in turn, on its own connection, until `stop`."""
    cri = daemon.client()
    requests: dict[str, Any] = {
        "ListPodSandbox": msg("ListPodSandboxRequest"),
        "ListContainers": msg("ListContainersRequest"),
        "PodSandboxStatus": msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id),
        "ContainerStatus": msg("ContainerStatusRequest", container_id=ctr_id),
        "ListContainerStats": msg("ListContainerStatsRequest"),
    }
    try:
        while not stop.is_set():
            for name in READ_CALLS:
                start = time.monotonic()
                try:
                    await getattr(cri.runtime, name)(requests[name], timeout=READ_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    raise AssertionError(f"{name}: {exc.code().name} after "
                                         f"{time.monotonic() - start:.1f}s: {exc.details()}"
                                         ) from exc
                latencies.setdefault(name, []).append(time.monotonic() - start)
    finally:
        await cri.close()


async def churn(daemon: Daemon, image: str, cycles: int, clients: int = 20,
                parallel: int = 2, wedged: bool = False) -> ChurnResult:
    cri = daemon.client()
    try:
        await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=image)))
        # A warm-up cycle (templates, caches), then the baseline; then a steady pod the
        # readers ask about (and the wedged one), both gone again before the last reading.
        await _remove(cri, (await _pod_with_container(cri, "churn-warm", image))[0])
        before = await settled_facts(cri)
        files_before = open_files(before["pid"])
        steady = await _pod_with_container(cri, "churn-steady", image)
        stuck: tuple[str, str] | None = None
        if wedged:
            stuck = await _pod_with_container(cri, "churn-wedged", image)
        for pid in vm_pids_of(stuck[0]) if stuck else []:
            os.kill(pid, signal.SIGSTOP)
        latencies: dict[str, list[float]] = {}
        stop = asyncio.Event()
        readers = [asyncio.create_task(_reader(daemon, *steady, stop, latencies))
                   for _ in range(clients)]
        started = time.monotonic()
        wedged_exec = ""
        try:
            if stuck is not None:
                try:
                    await cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=stuck[1],
                                                   cmd=["true"], timeout=2), timeout=30)
                    wedged_exec = "answered"
                except grpc.aio.AioRpcError as exc:
                    wedged_exec = exc.code().name
            for first in range(0, cycles, parallel):
                batch = range(first, min(cycles, first + parallel))
                made = await asyncio.gather(*(
                    _pod_with_container(cri, f"churn-{i}", image) for i in batch))
                await asyncio.gather(*(_remove(cri, pod_id) for pod_id, _ in made))
        finally:
            stop.set()
            await asyncio.gather(*readers)
            for pid in vm_pids_of(stuck[0]) if stuck else []:
                os.kill(pid, signal.SIGCONT)
        seconds = time.monotonic() - started
        for pod in (steady, stuck):
            if pod is not None:
                await _remove(cri, pod[0])
        after = await settled_facts(cri)
        return ChurnResult(cycles, seconds, before, after, latencies, wedged_exec,
                           files_before, open_files(after["pid"]))
    finally:
        await cri.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
