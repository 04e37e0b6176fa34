"""Just enough of kube-apiserver for a real `kubectl exec/attach/port-forward`: it serves one
running pod and, like the apiserver does for kubelet's streaming URLs, proxies each upgrade
request byte for byte to the URL our CRI call would return. So kubectl's own SPDY (client-go,
moby/spdystream) and WebSocket (gorilla) clients talk to our streaming server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import parse_qs, urlsplit

from criserver.runtime.streaming.portforward import PortForwardRequest
from criserver.runtime.streaming.remotecommand import StdioRequest
from criserver.runtime.streaming.server import StreamingServer
from tests.runtime.streaming.conftest import CONTAINER, POD
from tests.runtime.streaming.local_backend import LocalBackend

POD_JSON = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web", "namespace": "default", "uid": "1234"},
    "spec": {"containers": [{"name": "app", "image": "busybox", "stdin": True}]},
    "status": {"phase": "Running",
               "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0,
                                      "image": "busybox", "imageID": "",
                                      "state": {"running": {}}}]},
}

# Legacy discovery (kubectl maps "pod/web" to a resource through it).
_SUBRESOURCES = ("exec", "attach", "portforward")
DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {
        "kind": "APIResourceList", "groupVersion": "v1",
        "resources": [{"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
                       "verbs": ["get", "list"], "shortNames": ["po"]}] + [
            {"name": f"pods/{sub}", "singularName": "", "namespaced": True,
             "kind": "PodExecOptions", "verbs": ["create", "get"]} for sub in _SUBRESOURCES],
    },
}


class FakeApiServer:
    def __init__(self, streaming: StreamingServer, backend: LocalBackend) -> None:
        self.streaming = streaming
        self.backend = backend
        self.upgrades: list[str] = []  # the Upgrade header of each proxied request
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def kubeconfig(self) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test",
                          "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "test",
                          "context": {"cluster": "test", "user": "test",
                                      "namespace": "default"}}],
        })

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
                           for line in head.decode().split("\r\n")[1:] if ":" in line}
                if int(headers.get("content-length", "0")):
                    await reader.readexactly(int(headers["content-length"]))
                url = urlsplit(target)
                action = url.path.rsplit("/", 1)[-1]
                if "upgrade" in headers.get("connection", "").lower() and action in (
                        "exec", "attach", "portforward"):
                    await self._proxy(head, url.path, url.query, action, headers, reader,
                                      writer)
                    return
                if method == "GET" and url.path == "/api/v1/namespaces/default/pods/web":
                    self._reply(writer, 200, json.dumps(POD_JSON))
                elif method == "GET" and url.path in DISCOVERY:
                    self._reply(writer, 200, json.dumps(DISCOVERY[url.path]))
                else:
                    self._reply(writer, 404, json.dumps({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"}))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, code: int, body: str) -> None:
        data = body.encode()
        writer.write(f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)

    async def _proxy(self, head: bytes, path: str, query: str, action: str,
                     headers: dict[str, str], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.upgrades.append(headers.get("upgrade", ""))
        params = parse_qs(query)

        def flag(name: str) -> bool:
            return params.get(name, ["false"])[0] in ("1", "true")

        if action == "portforward":
            target = self.streaming.prepare(PortForwardRequest(self.backend, POD))
        else:
            target = self.streaming.prepare(StdioRequest(
                action, self.backend, POD, CONTAINER, tuple(params.get("command", [])),  # type: ignore[arg-type]
                tty=flag("tty"), stdin=flag("stdin"), stdout=flag("stdout"),
                stderr=flag("stderr")))
        parts = urlsplit(target)
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port)
        request_line, rest = head.split(b"\r\n", 1)
        method = request_line.split(b" ", 1)[0]
        up_writer.write(method + f" {parts.path}?{query} HTTP/1.1\r\n".encode() + rest)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
