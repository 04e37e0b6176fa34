"""Serving HTTP/2 over a virtio-serial port: finding the port, an asyncio transport around its
fd, and the connection life cycle (host connects, disconnects, reconnects on the same fd).

The port is not a socket: while no host is connected, reads return EOF at once and poll() says
readable + hang-up, so watching it would spin. The guest kernel sends SIGIO when the host
connects or disconnects; the agent stops watching the fd on EOF and waits for that signal.
Each host connection starts with the HTTP/2 client preface, which starts a fresh server
protocol: the previous connection's state (and its unread bytes) belong to a dead peer.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vmagent")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_READ_SIZE = 256 * 1024
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024
# Errors that mean "no peer on the other end": EIO is what a pty master reports without a slave.
_GONE_ERRNOS = (errno.EIO, errno.EPIPE, errno.ECONNRESET, errno.ENODEV, errno.ENXIO)


def find_port(name: str, sys_dir: str = "/sys/class/virtio-ports") -> str:
    """/dev path of the virtio-serial port called `name` (there is no udev for by-name links)."""
    try:
        entries = sorted(os.listdir(sys_dir))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(sys_dir, entry, "name")) as f:  # sysfs: no blocking I/O
                if f.read().strip() == name:
                    return os.path.join("/dev", entry)
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r} under {sys_dir}")


class FdTransport(asyncio.Transport):
    """Write side of one HTTP/2 connection over the port fd. The PortServer owns the reads;
    this transport buffers writes the fd does not take at once (virtio may take half a write)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        protocol: asyncio.Protocol,
        on_lost: Callable[[FdTransport], None],
        extra: dict[str, Any],
    ) -> None:
        super().__init__(extra)
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._closing = False
        self._lost = False
        self._paused = False
        self._writer_added = False

    @property
    def protocol(self) -> asyncio.Protocol:
        return self._protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._connection_lost(exc)
                return
            data = memoryview(data)[written:]
            if not data:
                return
            self._add_writer()
        self._buffer += data
        self._maybe_pause()

    def _add_writer(self) -> None:
        if not self._writer_added:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer_added = True

    def _remove_writer(self) -> None:
        if self._writer_added:
            self._loop.remove_writer(self._fd)
            self._writer_added = False

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self._connection_lost(exc)
            return
        del self._buffer[:written]
        if self._paused and len(self._buffer) <= _LOW_WATER:
            self._paused = False
            self._protocol.resume_writing()
        if not self._buffer:
            self._remove_writer()
            if self._closing:
                self._connection_lost(None)

    def _maybe_pause(self) -> None:
        if not self._paused and len(self._buffer) > _HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def close(self) -> None:
        """Stop writing once the buffer is flushed. The host does not see a close (a port has
        no end-of-stream); it sees no more answers and opens a new connection on its side."""
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self._closing = True
        self._connection_lost(None)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._remove_writer()
        self._buffer.clear()
        try:
            # asyncio's stubs say Exception; an OSError is all we ever pass.
            self._protocol.connection_lost(exc if isinstance(exc, Exception) else None)
        finally:
            self._on_lost(self)

    # Reading is driven by PortServer; these keep the Transport interface complete.
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._lost

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class PortServer:
    """Serves one protocol instance per host connection over a virtio-serial port fd.

    States: DISCONNECTED (fd not watched; waiting for SIGIO or the safety-net timer),
    LISTENING (host connected, reading; no HTTP/2 connection yet), SERVING (one protocol).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        name: str,
        poll_interval: float = 1.0,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._factory = protocol_factory
        self._name = name
        self._poll_interval = poll_interval
        self._reading = False
        self._transport: FdTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sigio_seen = 0
        self._sigio_at_start = 0
        self._discarding_logged = False
        self._unmatched = bytearray()
        self._closed = False
        self.connections = 0
        self.on_connection: Callable[[int], None] | None = None

    @property
    def state(self) -> str:
        if self._transport is not None:
            return "SERVING"
        return "LISTENING" if self._reading else "DISCONNECTED"

    def start(self) -> None:
        fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        # SIGIO must reach us before O_ASYNC is on, or the default action kills the process.
        signal.signal(signal.SIGIO, self._on_sigio)
        fcntl.fcntl(self._fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fl | os.O_NONBLOCK | os.O_ASYNC)
        self._check_link()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._stop_reading()
        if self._transport is not None:
            self._transport.abort()

    def _on_sigio(self, signum: int, frame: object) -> None:
        # A Python-level handler (not loop.add_signal_handler) so the counter is already bumped
        # when the reader callback that sees the new connection's preface runs.
        self._sigio_seen += 1
        self._loop.call_soon_threadsafe(self._check_link)

    def _host_connected(self) -> bool:
        p = select.poll()
        p.register(self._fd, select.POLLIN | select.POLLOUT)
        events = p.poll(0)
        return not (events and events[0][1] & select.POLLHUP)

    def _check_link(self) -> None:
        if self._closed or self._reading:
            return
        if self._host_connected():
            log.info("host connected port=%s", self._name)
            self._start_reading()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._poll_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._check_link()

    def _start_reading(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _GONE_ERRNOS:
                raise
            data = b""
        if not data:
            self._host_gone()
            return
        self._feed(data)

    def _host_gone(self) -> None:
        log.info("host disconnected port=%s", self._name)
        self._stop_reading()
        self._unmatched.clear()
        if self._transport is not None:
            self._transport.abort()
        # The host may have come back between its close and our EOF: look once more now.
        self._check_link()

    def _feed(self, data: bytes) -> None:
        if self._transport is not None and self._sigio_seen != self._sigio_at_start:
            # The link went down and up since this connection began: a preface now is the new
            # host connection, and anything before it is the old one's tail.
            idx = data.find(PREFACE)
            if idx >= 0:
                if idx:
                    self._transport.protocol.data_received(data[:idx])
                self._transport.abort()
                data = data[idx:]
        if self._transport is None:
            # Until a preface arrives, bytes are frames of a connection we no longer serve (the
            # agent restarted, or the host left before we read them): the host times out and
            # reconnects, and its new preface starts over. The preface may span two reads.
            data = bytes(self._unmatched) + data
            idx = data.find(PREFACE)
            if idx < 0:
                keep = len(PREFACE) - 1
                self._unmatched[:] = data[-keep:]
                if len(data) > keep and not self._discarding_logged:
                    log.warning("discarding bytes outside a connection port=%s", self._name)
                    self._discarding_logged = True
                return
            if idx and not self._discarding_logged:
                log.warning("discarding bytes outside a connection port=%s", self._name)
            self._unmatched.clear()
            data = data[idx:]
            self._new_connection()
        assert self._transport is not None
        self._transport.protocol.data_received(data)

    def _new_connection(self) -> None:
        self.connections += 1
        self._sigio_at_start = self._sigio_seen
        self._discarding_logged = False
        protocol = self._factory()
        transport = FdTransport(
            self._loop,
            self._fd,
            protocol,
            self._on_transport_lost,
            {"peername": self._name, "sockname": self._name, "connection": self.connections},
        )
        self._transport = transport
        log.info("new connection port=%s serial=%d", self._name, self.connections)
        protocol.connection_made(transport)
        if self.on_connection is not None:
            self.on_connection(self.connections)

    def _on_transport_lost(self, transport: FdTransport) -> None:
        if self._transport is transport:
            self._transport = None
