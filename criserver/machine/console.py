"""Exec on an IRI machine: its serial console, over the same streaming server as CRI exec.

The Exec RPC checks the machine and returns a single-use URL; the session the URL opens (SPDY or
WebSocket, remotecommand protocol) is bridged to the console socket QEMU listens on. QEMU serves
one client per console, and two people typing into one shell is never what either wanted: one
session per machine, a second is refused while the first lasts. Everything the guest prints is
in the machine's console log whether or not a session is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.errors import FailedPrecondition, Unavailable
from criserver.runtime.streaming.interface import ByteSink, ByteSource
from criserver.runtime.streaming.remotecommand import Stdio
from criserver.runtime.streaming.server import StreamingServer

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


@dataclass
class _Sessions:
    """Machines with a console session open (shared by the broker and its requests)."""

    open: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ConsoleRequest:
    """A console session as its token names it (a remotecommand StdioTarget)."""

    machine_id: str
    socket_path: Path
    sessions: _Sessions
    kind: Literal["exec", "attach"] = "exec"
    cmd: tuple[str, ...] = ()
    tty: bool = True
    stdin: bool = True
    stdout: bool = True
    stderr: bool = False

    @property
    def subject(self) -> str:
        return f"console machine={self.machine_id}"

    def start(self, stdio: Stdio) -> Awaitable[int | None]:
        return self._run(stdio)

    async def _run(self, stdio: Stdio) -> int | None:
        if self.machine_id in self.sessions.open:
            raise FailedPrecondition(f"machine {self.machine_id}: a console session is open")
        self.sessions.open.add(self.machine_id)
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError as exc:
                raise Unavailable(f"machine {self.machine_id}: console not reachable: "
                                  f"{exc}") from exc
            log.info("console session opened machine=%s", self.machine_id)
            try:
                await _bridge(reader, writer, stdio.stdin, stdio.stdout)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                log.info("console session closed machine=%s", self.machine_id)
        finally:
            self.sessions.open.discard(self.machine_id)
        return None


async def _bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  stdin: ByteSource | None, stdout: ByteSink | None) -> None:
    """Client input to the console and console output to the client, until either side ends."""

    async def upstream() -> None:
        if stdin is None:
            await asyncio.Event().wait()  # nothing to send: the session lasts as long as output
        assert stdin is not None
        with contextlib.suppress(ConnectionError):
            async for chunk in stdin:
                writer.write(chunk)
                await writer.drain()

    async def downstream() -> None:
        while chunk := await reader.read(CHUNK):
            if stdout is not None:
                await stdout.write(chunk)

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a broken console raises here
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ConsoleBroker:
    """Hands out console URLs (the service's ExecConsole seam)."""

    def __init__(self, server: Callable[[], Awaitable[StreamingServer]],
                 console_socket: Callable[[str], Path | None]) -> None:
        """`console_socket(machine_id)`: where its running VM's console listens, or None."""
        self._server = server
        self._console_socket = console_socket
        self._sessions = _Sessions()

    def busy(self, machine_id: str) -> bool:
        return machine_id in self._sessions.open

    async def exec_url(self, machine_id: str, request: iri.ExecRequest) -> str:
        """A single-use URL for a console session on `machine_id`.

        :raises FailedPrecondition: a session is open on this machine.
        :raises Unavailable: the machine is not running.
        :raises ResourceExhausted: too many URLs handed out and not used yet.
        """
        if self.busy(machine_id):
            raise FailedPrecondition(f"machine {machine_id}: a console session is already open")
        socket_path = self._console_socket(machine_id)
        if socket_path is None:
            raise Unavailable(f"machine {machine_id} is not running: no console to open")
        server = await self._server()
        return server.prepare(ConsoleRequest(machine_id, socket_path, self._sessions))
