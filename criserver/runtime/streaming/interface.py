"""The seam between the streaming server and whatever runs containers.

The server speaks the wire protocols (SPDY/3.1, WebSocket) and hands a backend plain async byte
sources and sinks; the backend moves bytes to and from the process (or the pod's port) and never
sees a frame. One call is one session: it returns when the session is over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from criserver.store.records import ContainerRecord, PodRecord


@dataclass(frozen=True)
class TerminalSize:
    width: int  # columns
    height: int  # rows


class ByteSink(Protocol):
    """Where a backend writes output: one client stream (stdout, stderr, port data)."""

    async def write(self, data: bytes) -> None:
        """Send `data`; returns once the client side took it (a slow client holds the caller
        here: that is the back-pressure). After the client has gone, data is dropped."""

    async def close(self) -> None:
        """End of output (the client sees EOF). Idempotent."""


# Client input (stdin, port-forward data): chunks until the client half-closes (iteration
# ends); iteration raises ConnectionError when the client went away instead, which is not EOF.
ByteSource = AsyncIterator[bytes]
# Terminal resizes from the client, the initial size first when the client sends one.
ResizeSource = AsyncIterator[TerminalSize]


@runtime_checkable
class StreamingBackend(Protocol):
    """What a sandbox backend implements to serve `kubectl exec/attach/port-forward`.

    Cancellation means the client went away (or the daemon stops): `exec` kills the process it
    started, `attach` detaches (the container keeps running), `port_forward` closes the
    connection into the pod. A sink or source of a cancelled call must not be used afterwards.
    """

    async def exec(
        self,
        pod: PodRecord,
        container: ContainerRecord,
        cmd: list[str],
        *,
        tty: bool,
        stdin: ByteSource | None,
        stdout: ByteSink | None,
        stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        """Run `cmd` in the container, relay its stdio until it exits and its output is
        written, and return its exit code (128 + N when killed by signal N).

        With `tty`, stdout carries the terminal's output and stderr is None. Raise (any
        exception) when the command cannot be run at all: the client sees the message.
        """

    async def attach(
        self,
        pod: PodRecord,
        container: ContainerRecord,
        *,
        tty: bool,
        stdin: ByteSource | None,
        stdout: ByteSink | None,
        stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> None:
        """Relay the running container's main process stdio until it exits."""

    async def port_forward(
        self, pod: PodRecord, port: int, *, inbound: ByteSource, outbound: ByteSink
    ) -> None:
        """Connect to `port` inside the pod's network namespace and relay both ways: `inbound`
        ends when the client half-closes (shut down writing to the port then); close
        `outbound` at the port's EOF. Return when both directions are done.

        Raise (e.g. ConnectionRefusedError) when the port cannot be reached: the client sees
        the message on the request's error stream.
        """
