"""Interoperability with the real clients: kubectl (client-go's SPDY executor over
moby/spdystream, and its WebSocket executor) through a fake apiserver that proxies upgrades to
our streaming server, as kube-apiserver does. Skipped where no kubectl is installed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import shutil
import struct
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criserver.runtime.streaming.interface import TerminalSize
from criserver.runtime.streaming.server import StreamingServer
from tests.runtime.streaming.fake_apiserver import FakeApiServer
from tests.runtime.streaming.local_backend import LocalBackend

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")


@pytest.fixture
async def apiserver(server: StreamingServer, backend: LocalBackend,
                    tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    api = FakeApiServer(server, backend)
    await api.start()
    (tmp_path / "kubeconfig").write_text(api.kubeconfig())
    try:
        yield api
    finally:
        await api.stop()


def _env(tmp_path: Path, websockets: bool) -> dict[str, str]:
    return {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "kubeconfig"),
            "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": str(websockets).lower(),
            "KUBECTL_PORT_FORWARD_WEBSOCKETS": str(websockets).lower()}


async def kubectl(tmp_path: Path, *args: str, stdin: bytes = b"",
                  websockets: bool = False) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "kubectl", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_env(tmp_path, websockets))
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out, err


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket"])
async def test_kubectl_exec(apiserver: FakeApiServer, tmp_path: Path, websockets: bool) -> None:
    code, out, err = await kubectl(
        tmp_path, "exec", "-i", "web", "--", "sh", "-c", "cat; echo to-err >&2; exit 3",
        stdin=b"hello from kubectl\n", websockets=websockets)
    assert out == b"hello from kubectl\n", err
    assert b"to-err" in err
    assert code == 3  # the exit code travelled in the v4/v5 Status
    assert apiserver.upgrades == (["websocket"] if websockets else ["SPDY/3.1"])


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket"])
async def test_kubectl_exec_large_output(apiserver: FakeApiServer, tmp_path: Path,
                                         websockets: bool) -> None:
    size = 20 * 1024 * 1024  # far beyond any window: spdystream sends no WINDOW_UPDATE
    code, out, err = await kubectl(tmp_path, "exec", "web", "--", "head", "-c", str(size),
                                   "/dev/zero", websockets=websockets)
    assert (code, len(out)) == (0, size), err


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket"])
async def test_kubectl_attach(apiserver: FakeApiServer, backend: LocalBackend, tmp_path: Path,
                              websockets: bool) -> None:
    await backend.start_main("c" * 64, ["sh", "-c", "while read l; do echo got:$l; done"])
    code, out, err = await kubectl(tmp_path, "attach", "-i", "web", stdin=b"a\nb\n",
                                   websockets=websockets)
    assert (code, out) == (0, b"got:a\ngot:b\n"), err


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket"])
async def test_kubectl_port_forward(apiserver: FakeApiServer, tmp_path: Path,
                                    echo_port: int, websockets: bool) -> None:
    # Over WebSocket, client-go tunnels the SPDY session (SPDY/3.1+portforward.k8s.io) and
    # falls back to a SPDY upgrade if refused: the one upgrade seen shows it was not.
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "port-forward", "pod/web", f":{echo_port}", "--address", "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_env(tmp_path, websockets))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        # "Forwarding from 127.0.0.1:LOCAL -> REMOTE"
        local_port = int(line.split(b"->")[0].rsplit(b":", 1)[1])
        for _ in range(3):  # each connection is a new stream pair on one SPDY connection
            reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
            payload = os.urandom(300_000)
            writer.write(payload)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            assert echoed == payload
            writer.close()
        assert apiserver.upgrades == ["websocket" if websockets else "SPDY/3.1"]
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket"])
async def test_kubectl_exec_tty(apiserver: FakeApiServer, backend: LocalBackend,
                                tmp_path: Path, websockets: bool) -> None:
    # kubectl on a terminal of 33x111: it sends that size on the resize stream/channel.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "exec", "-it", "web", "--", "sh", "-c", "sleep 0.5; stty size; exit 5",
        stdin=slave, stdout=slave, stderr=slave, env=_env(tmp_path, websockets))
    os.close(slave)

    def read_all() -> bytes:
        out = b""
        with contextlib.suppress(OSError):  # EIO once kubectl closed the terminal
            while chunk := os.read(master, 4096):
                out += chunk
        return out

    try:
        output = await asyncio.wait_for(asyncio.to_thread(read_all), 60)
        assert await proc.wait() == 5
        assert b"33 111" in output, output
        assert backend.resizes and backend.resizes[0] == TerminalSize(width=111, height=33)
    finally:
        os.close(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
