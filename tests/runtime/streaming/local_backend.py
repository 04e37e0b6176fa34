"""A test double for the streaming protocol tests: a backend that streams, running commands as host
subprocesses (a pty for TTY sessions) and forwards ports to 127.0.0.1 on the host.

It proves the wire protocols, not the micro-VM path: the real backend relays the same calls to
the guest agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import struct
import termios
from dataclasses import dataclass, field
from pathlib import Path

from criserver.config import Config
from criserver.runtime.backend import BackendContext, BackendFeatures, BaseBackend
from criserver.runtime.streaming.interface import (
    ByteSink,
    ByteSource,
    ResizeSource,
    TerminalSize,
)
from criserver.store.records import ContainerRecord, PodRecord


def _exit_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


async def _pump_out(stream: asyncio.StreamReader, sink: ByteSink) -> None:
    while data := await stream.read(65536):
        await sink.write(data)


async def _pump_in(source: ByteSource, stdin: asyncio.StreamWriter) -> None:
    try:
        async for chunk in source:
            stdin.write(chunk)
            await stdin.drain()
    except ConnectionError:
        return
    with contextlib.suppress(ConnectionError, OSError):
        stdin.write_eof()


def _set_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.height, size.width, 0, 0))


def _controlling_tty() -> None:  # runs in the child, after setsid
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@dataclass
class MainProcess:
    """A container's main process, for attach."""

    proc: asyncio.subprocess.Process
    output: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


class LocalBackend(BaseBackend):
    name = "local"
    features = BackendFeatures(streaming=True)

    def __init__(self) -> None:
        super().__init__({}, BackendContext(handler="local", root=Path("/nonexistent"),
                                            state=Path("/nonexistent"), config=Config(),
                                            events=None))  # type: ignore[arg-type]
        self.processes: list[asyncio.subprocess.Process] = []
        self.mains: dict[str, MainProcess] = {}
        self.resizes: list[TerminalSize] = []

    # -- exec ----------------------------------------------------------------------------

    async def exec(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        if tty:
            return await self._exec_tty(cmd, stdin, stdout, resize)
        pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=pipe if stdin else null, stdout=pipe if stdout else null,
            stderr=pipe if stderr else null)
        self.processes.append(proc)
        feeder = None
        if stdin is not None and proc.stdin is not None:
            feeder = asyncio.create_task(_pump_in(stdin, proc.stdin))
        try:
            outputs = []
            if stdout is not None and proc.stdout is not None:
                outputs.append(_pump_out(proc.stdout, stdout))
            if stderr is not None and proc.stderr is not None:
                outputs.append(_pump_out(proc.stderr, stderr))
            await asyncio.gather(*outputs)
            return _exit_code(await proc.wait())
        finally:
            if feeder is not None:
                feeder.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def _exec_tty(
        self, cmd: list[str], stdin: ByteSource | None, stdout: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_controlling_tty)
        os.close(slave)
        self.processes.append(proc)
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        output: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: every slave end is closed
                data = b""
            if not data:
                loop.remove_reader(master)
            output.put_nowait(data)

        async def feed() -> None:
            if stdin is None:
                return
            async for chunk in stdin:
                os.write(master, chunk)
            os.write(master, b"\x04")  # EOF on a terminal is ^D

        async def sizes() -> None:
            if resize is None:
                return
            async for size in resize:
                self.resizes.append(size)
                _set_size(master, size)

        loop.add_reader(master, readable)
        helpers = [asyncio.create_task(feed()), asyncio.create_task(sizes())]
        try:
            while data := await output.get():
                if stdout is not None:
                    await stdout.write(data)
            return _exit_code(await proc.wait())
        finally:
            for task in helpers:
                task.cancel()
            loop.remove_reader(master)
            os.close(master)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    # -- attach --------------------------------------------------------------------------

    async def start_main(self, container_id: str, cmd: list[str]) -> MainProcess:
        """Start a container's main process (stdin and stdout piped) for attach tests."""
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.processes.append(proc)
        main = self.mains[container_id] = MainProcess(proc)

        async def collect() -> None:
            assert proc.stdout is not None
            while data := await proc.stdout.read(65536):
                await main.output.put(data)
            await main.output.put(None)

        asyncio.get_running_loop().create_task(collect())
        return main

    async def attach(
        self, pod: PodRecord, container: ContainerRecord, *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> None:
        main = self.mains[container.id]
        feeder = None
        if stdin is not None and main.proc.stdin is not None:
            feeder = asyncio.create_task(self._feed_main(stdin, main.proc.stdin))
        try:
            while (data := await main.output.get()) is not None:
                if stdout is not None:
                    await stdout.write(data)
        finally:
            if feeder is not None:
                feeder.cancel()  # detach: the process keeps running

    @staticmethod
    async def _feed_main(source: ByteSource, stdin: asyncio.StreamWriter) -> None:
        async for chunk in source:
            stdin.write(chunk)
            await stdin.drain()
        stdin.write_eof()  # the client closed stdin: pass it on, as CRI's stdin_once does

    # -- port-forward --------------------------------------------------------------------

    async def port_forward(
        self, pod: PodRecord, port: int, *, inbound: ByteSource, outbound: ByteSink
    ) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def upstream() -> None:
            async for chunk in inbound:
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        up = asyncio.create_task(upstream())
        try:
            while data := await reader.read(65536):
                await outbound.write(data)
            await outbound.close()
        finally:
            up.cancel()
            writer.close()
