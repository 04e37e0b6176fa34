"""exec, attach and port-forward of the runc backend (streams.py) with Debian's runc, a busybox
container watched by ctrmon, and real network namespaces. The streaming server's client
streams are the in-memory sinks and sources of tests/vmagent/test_streams.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from criserver.backends.runc import streams
from criserver.backends.runc.monitor import Monitor, launch
from criserver.backends.runc.runc import Runc
from criserver.errors import CriError
from criserver.network import netns
from criserver.runtime.streaming.interface import TerminalSize
from tests.runc.test_ctrmon import REAL_RUNC, busybox_bundle, needs_real_runc
from tests.vmagent.test_streams import Sink, Source, sizes

APPLETS = ("cat", "echo", "ps", "sleep", "stty", "kill")


@dataclass
class Ctr:
    runc: Runc
    bundle: Path
    id: str
    spec: dict[str, Any]
    monitor: Monitor

    async def exec(self, ctrmon: str, cmd: list[str], *, tty: bool = False,
                   stdin: Source | None = None, stdout: Sink | None = None,
                   stderr: Sink | None = None,
                   resize: AsyncIterator[TerminalSize] | None = None) -> int:
        return await streams.exec_in_container(
            self.runc, ctrmon, self.bundle, self.id, self.spec, cmd, tty=tty, stdin=stdin,
            stdout=stdout, stderr=stderr, resize=resize)

    def processes(self) -> str:
        return subprocess.run([REAL_RUNC, "--root", str(self.runc.root), "exec", self.id, "ps"],
                              check=True, capture_output=True, text=True).stdout

    def exec_files(self) -> list[str]:
        return [p.name for p in self.bundle.glob("exec-*")]


@pytest.fixture
async def ctr(tmp_path: Path, ctrmon_bin: str) -> AsyncIterator[Ctr]:
    """A running busybox container whose init is `cat` on a stdin ctrmon holds."""
    bundle = busybox_bundle(tmp_path, ["cat"])
    for applet in APPLETS:
        (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
    runc = Runc(REAL_RUNC, tmp_path / "runc-root")
    cid = f"streams-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        mon = await launch(ctrmon_bin, runc=REAL_RUNC, runc_root=runc.root, bundle=bundle,
                           container_id=cid, log_path=str(tmp_path / "c.log"), stdin=True)
        await runc.start(cid)
        spec = json.loads((bundle / "config.json").read_text())
        yield Ctr(runc, bundle, cid, spec, mon)
    finally:
        subprocess.run([REAL_RUNC, "--root", str(runc.root), "delete", "--force", cid],
                       capture_output=True)


# --- exec ---------------------------------------------------------------------------------------


@needs_real_runc
async def test_exec_output_and_exit_code(ctr: Ctr, ctrmon_bin: str) -> None:
    out, err = Sink(), Sink()
    code = await ctr.exec(ctrmon_bin, ["sh", "-c", "echo out; echo err >&2; exit 3"],
                          stdout=out, stderr=err)
    assert code == 3
    assert (bytes(out.data), bytes(err.data)) == (b"out\n", b"err\n")
    assert ctr.exec_files() == []


@needs_real_runc
async def test_exec_stdin_and_signal(ctr: Ctr, ctrmon_bin: str) -> None:
    src, out = Source(), Sink()
    src.put(b"hello ")
    src.put(b"world\n")
    src.end()  # the half-close closes cat's stdin
    assert await ctr.exec(ctrmon_bin, ["cat"], stdin=src, stdout=out) == 0
    assert bytes(out.data) == b"hello world\n"
    assert await ctr.exec(ctrmon_bin, ["sh", "-c", "kill -9 $$"]) == 137


@needs_real_runc
async def test_exec_that_cannot_run_raises(ctr: Ctr, ctrmon_bin: str) -> None:
    with pytest.raises(CriError, match="no-such-command"):
        await ctr.exec(ctrmon_bin, ["no-such-command"], stdout=Sink(), stderr=Sink())
    assert ctr.exec_files() == []


@needs_real_runc
async def test_exec_cancelled_kills_the_process(ctr: Ctr, ctrmon_bin: str) -> None:
    out = Sink()
    task = asyncio.create_task(
        ctr.exec(ctrmon_bin, ["sh", "-c", "echo started; exec sleep 1000"], stdin=Source(),
                 stdout=out, stderr=Sink()))
    await out.wait_for(b"started")
    assert "sleep 1000" in ctr.processes()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert "sleep 1000" not in ctr.processes()
    assert ctr.exec_files() == []


@needs_real_runc
async def test_exec_tty_size_stdin_and_exit_code(
    ctr: Ctr, ctrmon_asan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ctrmon with ASan+UBSan, halting on a report: the exit code would not be the process's.
    monkeypatch.setenv("UBSAN_OPTIONS", "halt_on_error=1")
    queue: asyncio.Queue[TerminalSize] = asyncio.Queue()
    queue.put_nowait(TerminalSize(width=100, height=30))  # the first size: the process starts
    src, out = Source(), Sink()
    task = asyncio.create_task(ctr.exec(
        ctrmon_asan, ["sh", "-c", "stty size; cat; echo done; exit 5"], tty=True, stdin=src,
        stdout=out, resize=sizes(queue)))
    await out.wait_for(b"30 100\r\n", 10)
    src.put(b"typed\n")
    await out.wait_for(b"typed\r\ntyped\r\n", 10)  # the terminal's echo, then cat's
    src.end()  # EOF on a terminal: ^D ends cat
    assert await asyncio.wait_for(task, 10) == 5
    assert out.data.endswith(b"done\r\n")
    assert ctr.exec_files() == []


@needs_real_runc
async def test_exec_tty_resize_and_cancel(ctr: Ctr, ctrmon_bin: str) -> None:
    queue: asyncio.Queue[TerminalSize] = asyncio.Queue()
    queue.put_nowait(TerminalSize(width=80, height=24))
    out = Sink()
    task = asyncio.create_task(ctr.exec(
        ctrmon_bin, ["sh", "-c", "while :; do stty size; sleep 0.05; done"], tty=True,
        stdin=Source(), stdout=out, resize=sizes(queue)))
    await out.wait_for(b"24 80\r\n", 10)
    queue.put_nowait(TerminalSize(width=120, height=40))
    await out.wait_for(b"40 120\r\n", 10)
    assert "stty size" in ctr.processes()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert "while :" not in ctr.processes()
    assert ctr.exec_files() == []


@needs_real_runc
async def test_exec_tty_that_cannot_run_raises(ctr: Ctr, ctrmon_bin: str) -> None:
    with pytest.raises(CriError, match="no-such-command"):
        await ctr.exec(ctrmon_bin, ["no-such-command"], tty=True, stdout=Sink())
    assert ctr.exec_files() == []


# --- attach -------------------------------------------------------------------------------------


@needs_real_runc
async def test_attach_relays_then_detaches(ctr: Ctr) -> None:
    src, out = Source(), Sink()
    first = asyncio.create_task(streams.attach_container(
        ctr.monitor, tty=False, stdin=src, stdout=out, stderr=Sink(), resize=None))
    src.put(b"ping\n")
    await out.wait_for(b"ping\n", 10)
    first.cancel()  # detach: the container keeps running
    with pytest.raises(asyncio.CancelledError):
        await first
    state = await ctr.runc.state(ctr.id)
    assert state is not None and state["status"] == "running"

    out2 = Sink()
    second = asyncio.create_task(streams.attach_container(
        ctr.monitor, tty=False, stdin=None, stdout=out2, stderr=None, resize=None))
    await asyncio.sleep(0.1)  # attached before the container goes on
    await ctr.monitor.close_stdin()  # cat ends: the attach ends with the container
    await asyncio.wait_for(second, 10)
    assert (await asyncio.wait_for(ctr.monitor.wait(), 10)).exit_code == 0


# --- port-forward -------------------------------------------------------------------------------


async def upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Each chunk back upper-cased at once; at EOF a last "bye", then close."""
    while data := await reader.read(1024):
        writer.write(data.upper())
        await writer.drain()
    writer.write(b"bye")
    await writer.drain()
    writer.close()


def listener(family: int, address: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen()
    sock.setblocking(False)
    return sock


async def forward_session(netns_path: Path | None, port: int) -> None:
    src, out = Source(), Sink()
    task = asyncio.create_task(streams.port_forward(netns_path, port, inbound=src, outbound=out))
    src.put(b"a")
    await out.wait_for(b"A", 10)  # both ways at once, before any half-close
    src.put(b"b")
    await out.wait_for(b"AB", 10)
    src.end()  # our half-close: the server sees EOF, answers, closes
    await asyncio.wait_for(task, 10)
    assert bytes(out.data) == b"ABbye" and out.closed


@pytest.fixture
async def pod_netns(tmp_path: Path) -> AsyncIterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    directory = tmp_path / "netns"
    path = directory / "pod"
    try:
        await netns.create(path)
        subprocess.run(["nsenter", f"--net={path}", "ip", "link", "set", "lo", "up"], check=True)
        yield path
    finally:
        await netns.remove(path)
        await netns.release_dir(directory)


async def test_port_forward_into_netns(pod_netns: Path) -> None:
    # Only on ::1, only inside the pod's namespace: 127.0.0.1 is tried first and refused.
    sock = await netns.run_in(pod_netns, listener, socket.AF_INET6, "::1")
    server = await asyncio.start_server(upper_echo, sock=sock)
    port = sock.getsockname()[1]
    try:
        await forward_session(pod_netns, port)
        with pytest.raises(ConnectionRefusedError, match=r"127\.0\.0\.1.*::1"):
            await streams.port_forward(None, port, inbound=Source(), outbound=Sink())
    finally:
        server.close()
        await server.wait_closed()


async def test_port_forward_host_network() -> None:
    server = await asyncio.start_server(upper_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await forward_session(None, port)
    finally:
        server.close()
        await server.wait_closed()


async def test_port_forward_refused_and_cancelled(pod_netns: Path) -> None:
    with pytest.raises(ConnectionRefusedError):
        await streams.port_forward(pod_netns, 1, inbound=Source(), outbound=Sink())
    closed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until our side closes
        closed.set()
        writer.close()

    sock = await netns.run_in(pod_netns, listener, socket.AF_INET, "127.0.0.1")
    server = await asyncio.start_server(hold, sock=sock)
    try:
        out = Sink()
        task = asyncio.create_task(streams.port_forward(
            pod_netns, sock.getsockname()[1], inbound=Source(), outbound=out))
        await asyncio.sleep(0.2)
        task.cancel()  # the client went away: the connection into the pod closes
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()
