"""runc's --console-socket: runc creates the pty inside the container (its own devpts, the
process's controlling terminal) and sends us the master end over a Unix socket (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import os
import socket

_RECEIVE_TIMEOUT = 60.0


class ConsoleSocket:
    """A listening socket for one runc call; `receive` returns the pty master's fd."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.exists(path):  # tmpfs
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    async def receive(self) -> int:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        try:
            conn.settimeout(_RECEIVE_TIMEOUT)
            # runc sends the pty's name with the fd; one recvmsg is enough (a blocking one, in
            # a thread, since the loop has no recvmsg with ancillary data).
            _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
        finally:
            conn.close()
        if not fds:
            raise OSError("runc sent no console fd")
        os.set_blocking(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
