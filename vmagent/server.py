"""The agent's gRPC server: one grpclib Server whose HTTP/2 protocol is bound to whichever
transport the VM offers (virtio-serial port, vsock listener, or a Unix socket for host runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from grpclib.server import Server

from vmagent.port import PortServer, find_port

if TYPE_CHECKING:
    from grpclib._typing import IServable

log = logging.getLogger("vmagent")

_VSOCK_DEVICE = "/dev/vsock"


def _resolve(spec: str) -> str:
    if spec == "auto":
        # A device node check: no I/O that could block.
        return "vsock" if os.path.exists(_VSOCK_DEVICE) else "serial"
    return spec


class AgentServer:
    """Owns the grpclib Server and the listener it is served on."""

    def __init__(self, handlers: list[IServable], transport: str, *, port_name: str,
                 vsock_port: int, poll_interval: float) -> None:
        self._grpc = Server(handlers)
        self._transport_spec = transport
        self._port_name = port_name
        self._vsock_port = vsock_port
        self._poll_interval = poll_interval
        self._port: PortServer | None = None
        self._listening = False
        self.kind = ""
        self._connections = 0

    @property
    def connections(self) -> int:
        """HTTP/2 connections served so far (the Health answer reports it)."""
        if self._port is not None:
            return self._port.connections
        return self._connections

    def _counting_factory(self) -> asyncio.Protocol:
        self._connections += 1
        # grpclib builds a fresh H2 protocol + handler per connection here; we reuse that seam
        # because grpclib has no public API for serving a non-socket transport.
        return self._grpc._protocol_factory()

    async def start(self) -> None:
        spec = _resolve(self._transport_spec)
        loop = asyncio.get_running_loop()
        if spec == "serial" or spec.startswith("fd:"):
            if spec == "serial":
                path = find_port(self._port_name)
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            else:
                path = spec
                fd = int(spec[3:])
                os.set_inheritable(fd, False)
            self._port = PortServer(loop, fd, self._grpc._protocol_factory, name=path,
                                    poll_interval=self._poll_interval)
            self._port.start()
            self.kind = "virtio-serial"
        elif spec == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((socket.VMADDR_CID_ANY, self._vsock_port))
            await self._listen(sock=sock)
            self.kind = "vsock"
        elif spec.startswith("unix:"):
            path = spec[5:]
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            await self._listen(sock=sock)
            self.kind = "unix"
        else:
            raise ValueError(f"unknown transport {spec!r}")
        log.info("serving transport=%s", self.kind)

    async def _listen(self, sock: socket.socket) -> None:
        sock.listen(16)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._counting_factory, sock=sock)
        self._listening = True

    def close(self) -> None:
        """Stop serving: the current connection's in-flight calls are cancelled."""
        if self._port is not None:
            self._port.close()
        if self._listening:
            self._server.close()
        for handler in list(self._grpc._handlers):
            handler.close()
