"""A stand-in for QEMU's virtio-serial port, used to run the real agent process on the host.

The agent gets the master side of a pty as its port fd. A Unix socket plays QEMU's
`-chardev socket,server=on`: each accepted client opens the pty slave (the host "connects"),
bytes are relayed both ways, and closing the client closes the slave (the host "disconnects").
Like the virtio console driver, a pty master then reports HUP and EOF/EIO while no slave is
open, and the same fd works again after a reopen; the kernel's SIGIO on host (dis)connection is
sent to the agent by hand, because a pty master gets none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty


class PortSim:
    def __init__(self, sock_path: str, *, keep_open: bool = False) -> None:
        self.sock_path = sock_path
        # keep_open: never close the slave between clients, as when a host reconnects before
        # the guest read the EOF: the agent must spot the new preface itself.
        self.keep_open = keep_open
        self.master, slave = os.openpty()
        self.slave_name = os.ttyname(slave)
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.close(slave)
        self.agent_pid: int | None = None
        self.agent_fd = self.master  # the agent inherits the master under the same number
        self._slave: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._one_client = asyncio.Lock()  # QEMU serves one client at a time
        self.sigio_sent = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, self.sock_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Client tasks own the slave fd: let them close it, so no fd is closed twice.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def _agent_wants_sigio(self) -> bool:
        """True once the agent set O_ASYNC on its port fd: the kernel signals only then."""
        try:
            with open(f"/proc/{self.agent_pid}/fdinfo/{self.agent_fd}") as f:
                flags = next(line for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            return False
        return bool(int(flags.split()[1], 8) & os.O_ASYNC)

    def _sigio(self) -> None:
        if self.agent_pid is not None and self._agent_wants_sigio():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.agent_pid, signal.SIGIO)
                self.sigio_sent += 1

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._one_client:
            loop = asyncio.get_running_loop()
            if self._slave is None:
                self._slave = os.open(self.slave_name, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                # Bytes the agent wrote for a previous client must not reach this one (virtio
                # drops what the host did not read before it closed).
                termios.tcflush(self._slave, termios.TCIFLUSH)
            slave = self._slave
            self._sigio()

            def from_agent() -> None:
                try:
                    data = os.read(slave, 65536)
                except (BlockingIOError, OSError):
                    return
                if data:
                    writer.write(data)

            loop.add_reader(slave, from_agent)
            try:
                while data := await reader.read(65536):
                    view = memoryview(data)
                    while view:
                        try:
                            n = os.write(slave, view)
                        except BlockingIOError:
                            await asyncio.sleep(0.001)
                            continue
                        view = view[n:]
            except ConnectionError:
                pass
            finally:
                loop.remove_reader(slave)
                writer.close()
                if not self.keep_open:
                    os.close(slave)
                    self._slave = None
                self._sigio()
