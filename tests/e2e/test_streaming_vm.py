"""kubectl exec/attach/port-forward into real micro-VMs: the daemon's CRI Exec, Attach and
PortForward calls, the URLs they return, and the SPDY and WebSocket test clients, against
busybox containers pulled from a real registry."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon
from tests.runtime.streaming.spdy_client import ClientStream, SpdyClient

pytestmark = pytest.mark.vm

V4 = "v4.channel.k8s.io"
PORT_FORWARD = "portforward.k8s.io"


class Pod:
    def __init__(self, cri: CRIClient, pod_id: str, name: str, image: str) -> None:
        self.cri = cri
        self.id = pod_id
        self.name = name
        self.image = image

    async def container(self, name: str, *command: str, **fields: object) -> str:
        cid = await self.cri.create_container(self.id, name, pod_name=self.name,
                                              image=self.image, command=list(command),
                                              **fields)
        await self.cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
        return cid

    async def state(self, cid: str) -> int:
        r = await self.cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
        return int(r.status.state)

    async def exec_sync(self, cid: str, *cmd: str) -> bytes:
        r = await self.cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid,
                                                cmd=list(cmd), timeout=30))
        assert r.exit_code == 0, r
        return bytes(r.stdout)

    async def exec_url(self, cid: str, cmd: list[str], **stdio: bool) -> str:
        r = await self.cri.runtime.Exec(msg("ExecRequest", container_id=cid, cmd=cmd, **stdio))
        return str(r.url)

    async def attach_url(self, cid: str, **stdio: bool) -> str:
        r = await self.cri.runtime.Attach(msg("AttachRequest", container_id=cid, **stdio))
        return str(r.url)

    async def port_forward_url(self, port: int) -> str:
        r = await self.cri.runtime.PortForward(msg("PortForwardRequest", pod_sandbox_id=self.id,
                                                   port=[port]))
        return str(r.url)


@pytest.fixture(scope="module")
async def pod(vm_daemon: Daemon, busybox_ref: str) -> AsyncIterator[Pod]:
    cri = vm_daemon.client()
    await cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=busybox_ref)))
    pod_id = await cri.run_pod("stream-pod")
    p = Pod(cri, pod_id, "stream-pod", busybox_ref)
    yield p
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.close()


@pytest.fixture(scope="module")
async def sleeper(pod: Pod) -> str:
    return await pod.container("sleeper", "sleep", "3600")


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def read_until(stream: ClientStream, needle: bytes, seen: bytearray,
                     timeout: float = 30) -> None:
    async def read() -> None:
        while needle not in seen:
            chunk = await stream.read()
            assert chunk, f"stream ended before {needle!r}: {bytes(seen)!r}"
            seen.extend(chunk)

    await asyncio.wait_for(read(), timeout)


async def open_spdy(url: str, kinds: tuple[str, ...]
                    ) -> tuple[SpdyClient, dict[str, ClientStream]]:
    """As client-go: the error stream first, then stdio; output streams half-closed at once."""
    client = await SpdyClient.connect(url, [V4])
    assert client.status == 101, client.body
    streams = {}
    for kind in ("error", *kinds):
        streams[kind] = s = await client.open_stream({"streamType": kind})
        if kind in ("error", "stdout", "stderr"):
            await s.close()
    return client, streams


async def test_exec_spdy_stdin_stdout_stderr_exit_code(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["sh", "-c", "cat; echo err >&2; exit 3"], stdin=True,
                             stdout=True, stderr=True)
    client, s = await open_spdy(url, ("stdin", "stdout", "stderr"))
    payload = b"hello from the host\n" * 5000  # several windows and agent credits
    await s["stdin"].write(payload)
    await s["stdin"].close()
    out, err, status = await asyncio.wait_for(asyncio.gather(
        s["stdout"].read_all(), s["stderr"].read_all(), s["error"].read_all()), 60)
    assert out == payload and err == b"err\n"
    status_json = json.loads(status)
    assert status_json["reason"] == "NonZeroExitCode"
    assert status_json["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    await client.close()


async def test_exec_success_status(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["cat", "/etc/hostname"], stdout=True)
    client, s = await open_spdy(url, ("stdout",))
    out, status = await asyncio.gather(s["stdout"].read_all(), s["error"].read_all())
    assert out.strip() and json.loads(status)["status"] == "Success"
    await client.close()


async def _ws_read_until(ws: aiohttp.ClientWebSocketResponse, channel: int, needle: bytes,
                         seen: dict[int, bytearray], timeout: float = 30) -> None:
    async def read() -> None:
        while needle not in seen.setdefault(channel, bytearray()):
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.BINARY, (message, seen)
            seen.setdefault(message.data[0], bytearray()).extend(message.data[1:])

    await asyncio.wait_for(read(), timeout)


async def test_exec_websocket_tty_echo_resize_exit_code(pod: Pod, sleeper: str) -> None:
    script = ("stty size; tty >/dev/null && echo is-a-tty; "
              "while read x; do echo \"got:$x\"; stty size; [ \"$x\" = q ] && exit 4; done")
    url = await pod.exec_url(sleeper, ["sh", "-c", script], tty=True, stdin=True, stdout=True)
    seen: dict[int, bytearray] = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=[V4]) as ws:
        assert ws.protocol == V4
        await ws.send_bytes(b"\x04" + json.dumps({"Width": 100, "Height": 30}).encode())
        await _ws_read_until(ws, 1, b"30 100", seen)  # the first size reached the process
        await _ws_read_until(ws, 1, b"is-a-tty", seen)
        await ws.send_bytes(b"\x04" + json.dumps({"Width": 120, "Height": 40}).encode())
        await ws.send_bytes(b"\x00hello\n")
        await _ws_read_until(ws, 1, b"got:hello", seen)
        for _ in range(50):  # the resize travels on its own stream: ask until it is seen
            if b"40 120" in seen[1]:
                break
            await ws.send_bytes(b"\x00again\n")
            with contextlib.suppress(TimeoutError):
                await _ws_read_until(ws, 1, b"got:again", seen, timeout=2)
        assert b"40 120" in seen[1]
        await ws.send_bytes(b"\x00q\n")
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            seen.setdefault(message.data[0], bytearray()).extend(message.data[1:])
    assert seen[1].count(b"hello") >= 2  # the terminal's echo and the script's answer
    status = json.loads(seen[3])
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "4"}]


async def test_exec_websocket_no_tty_base64(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["sh", "-c", "printf '\\001\\377'; exit 0"],
                             stdout=True)
    out: dict[int, bytes] = {}
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(url, protocols=["v4.base64.channel.k8s.io"]) as ws:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            channel = int(message.data[0])
            out[channel] = out.get(channel, b"") + base64.b64decode(message.data[1:])
    assert out[1] == b"\x01\xff"
    assert json.loads(out[3])["status"] == "Success"


async def test_client_disconnect_kills_exec(pod: Pod, sleeper: str) -> None:
    url = await pod.exec_url(sleeper, ["sh", "-c", "echo started; exec sleep 1234"],
                             stdout=True, stdin=True)
    client, s = await open_spdy(url, ("stdin", "stdout"))
    seen = bytearray()
    await read_until(s["stdout"], b"started", seen)

    async def running() -> bool:
        return b"sleep 1234" in await pod.exec_sync(sleeper, "ps", "-o", "args")

    assert await running()
    client.writer.close()  # the client vanishes mid-stream, no goodbye

    async def gone() -> bool:
        return not await running()

    await until(gone)


async def test_attach_tty_stdin(pod: Pod) -> None:
    cid = await pod.container(
        "interactive", "sh", "-c",
        "echo ready; while read x; do echo \"got:$x\"; stty size; done; echo bye",
        tty=True, stdin=True, stdin_once=True)
    url = await pod.attach_url(cid, tty=True, stdin=True, stdout=True)
    client, s = await open_spdy(url, ("stdin", "stdout", "resize"))
    await s["resize"].write(json.dumps({"Width": 91, "Height": 19}).encode())
    seen = bytearray()
    # Output is live from the attach on ("ready" may be before it): ask until answered.
    for _ in range(50):
        await s["stdin"].write(b"ping\n")
        with contextlib.suppress(TimeoutError):
            await read_until(s["stdout"], b"got:ping", seen, timeout=2)
            break
    assert b"got:ping" in seen
    await read_until(s["stdout"], b"19 91", seen)  # the size reached the container's pty
    await s["resize"].write(json.dumps({"Width": 92, "Height": 20}).encode())
    for _ in range(50):  # a later resize travels on its own stream: ask until it is seen
        await s["stdin"].write(b"again\n")
        with contextlib.suppress(TimeoutError):
            await read_until(s["stdout"], b"20 92", seen, timeout=2)
            break
    assert b"20 92" in seen
    # stdin_once: the first attach ending closes stdin; the shell reads EOF and exits.
    await s["stdin"].close()
    client.writer.close()
    await until(lambda: _exited(pod, cid))


async def _exited(pod: Pod, cid: str) -> bool:
    return await pod.state(cid) == enum("CONTAINER_EXITED")


async def test_attach_plain_stdin_pipe(pod: Pod) -> None:
    cid = await pod.container("reader", "sh", "-c", "read x; echo \"got:$x\"; cat >/dev/null",
                              stdin=True, stdin_once=True)
    url = await pod.attach_url(cid, stdin=True, stdout=True, stderr=True)
    client, s = await open_spdy(url, ("stdin", "stdout", "stderr"))
    await s["stdin"].write(b"line\n")
    seen = bytearray()
    await read_until(s["stdout"], b"got:line", seen)
    await s["stdin"].close()  # stdin_once: `cat` sees EOF, the container exits
    await until(lambda: _exited(pod, cid))
    assert await asyncio.wait_for(s["stdout"].read_all(), 30) == b""  # output ended
    await client.close()


async def test_port_forward_to_httpd(pod: Pod) -> None:
    await pod.container("web", "sh", "-c", "mkdir -p /www && echo hello-from-the-vm "
                        "> /www/index.html && head -c 300000 /dev/urandom > /www/big "
                        "&& exec httpd -f -p 8080 -h /www")
    async def fetch(path: str) -> bytes:
        url = await pod.port_forward_url(8080)  # a URL serves one connection
        client = await SpdyClient.connect(url, [PORT_FORWARD])
        assert client.status == 101, client.body
        try:
            headers = {"streamType": "error", "port": "8080", "requestID": "1"}
            error = await client.open_stream(headers)
            await error.close()
            data = await client.open_stream({**headers, "streamType": "data"})
            await data.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            await data.close()  # half-close: httpd still answers
            body, err = await asyncio.wait_for(
                asyncio.gather(data.read_all(), error.read_all()), 60)
            assert not err or body == b"", err
            return body
        finally:
            await client.close()

    reply = b""
    for _ in range(100):  # until httpd listens
        reply = await fetch("/")
        if reply:
            break
        await asyncio.sleep(0.3)
    assert reply.startswith(b"HTTP/1.") and b"hello-from-the-vm" in reply
    big = await fetch("/big")
    assert len(big.split(b"\r\n\r\n", 1)[1]) == 300000


async def test_port_forward_refused_port(pod: Pod) -> None:
    url = await pod.port_forward_url(9)
    client = await SpdyClient.connect(url, [PORT_FORWARD])
    headers = {"streamType": "error", "port": "9", "requestID": "1"}
    error = await client.open_stream(headers)
    await error.close()
    data = await client.open_stream({**headers, "streamType": "data"})
    message = (await asyncio.wait_for(error.read_all(), 30)).decode()
    assert "127.0.0.1:9: Connection refused" in message, message
    assert await data.read_all() == b""
    await client.close()
