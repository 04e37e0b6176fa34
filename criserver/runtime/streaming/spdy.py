"""SPDY/3.1, server side: framing, zlib header compression with the SPDY/3 dictionary, and one
session with its streams, flow control (WINDOW_UPDATE), PING and GOAWAY.

Written from the SPDY/3.1 draft. The session is transport-agnostic: it is fed the bytes read
from the connection and writes frames through a `Wire`. Kubernetes' peers (moby/spdystream) send
no WINDOW_UPDATE frames and rely on TCP back-pressure, so the peer's windows are enforced only
once the peer shows it keeps them (see `SpdySession._acquire_window`); TCP back-pressure
(`Wire.drain`) always applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9)
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
SETTINGS_INITIAL_WINDOW_SIZE = 7
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR, GOAWAY_INTERNAL_ERROR = 0, 1, 2

DEFAULT_WINDOW = 64 * 1024  # initial stream and session window (SPDY/3.1 section 2.6.8)
MAX_WINDOW = 2**31 - 1
MAX_DATA_FRAME = 32 * 1024  # payload of the DATA frames we send
MAX_HEADER_BLOCK = 256 * 1024  # decompressed; a peer cannot make us inflate more
MAX_STREAM_BUFFER = 4 * DEFAULT_WINDOW  # unread input per stream before we stop reading
LINGER = 2.0  # seconds after GOAWAY to let the peer close first (so it reads all we sent)


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


# The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): length-prefixed words,
# then a tail of common values. Checked against its published size and Adler-32 in the tests.
_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base "
    "content-encoding content-language content-length content-location content-md5 "
    "content-range content-type date etag expect expires from host if-match if-modified-since "
    "if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status "
    "200|OK version HTTP/1.1 url public set-cookie keep-alive origin"
).split()
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 "
    "Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 "
    "Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, "
    "Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(
    struct.pack(">I", len(w)) + w.encode() for w in (w.replace("|", " ") for w in _WORDS)
) + _TAIL.encode()

Headers = dict[str, list[str]]


class SpdyProtocolError(Exception):
    """The peer broke the protocol badly enough that the session must end."""


# -- frames ----------------------------------------------------------------------------------


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def encode_header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """The uncompressed name/value block; repeated names are joined with NUL, as the spec says."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), []).append(value)
    parts = [struct.pack(">I", len(merged))]
    for name, values in merged.items():
        raw_name, raw_value = name.encode(), "\0".join(values).encode()
        parts += [struct.pack(">I", len(raw_name)), raw_name,
                  struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(parts)


def decode_header_block(block: bytes) -> Headers:
    """:raises SpdyProtocolError: truncated block."""
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        offset, headers = 4, dict[str, list[str]]()
        for _ in range(count):
            (size,) = struct.unpack_from(">I", block, offset)
            name = block[offset + 4:offset + 4 + size].decode("latin-1").lower()
            offset += 4 + size
            (size,) = struct.unpack_from(">I", block, offset)
            value = block[offset + 4:offset + 4 + size].decode("latin-1")
            offset += 4 + size
            if offset > len(block):
                raise struct.error("header runs past the block")
            headers.setdefault(name, []).extend(value.split("\0"))
    except struct.error as exc:
        raise SpdyProtocolError(f"malformed header block: {exc}") from None
    return headers


class HeaderCompressor:
    """One zlib stream per direction for the whole session, flushed after each block."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zlib.DEFLATED, 15, zdict=DICTIONARY)

    def compress(self, headers: Iterable[tuple[str, str]]) -> bytes:
        return self._z.compress(encode_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self) -> None:
        self._z = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, data: bytes) -> Headers:
        """:raises SpdyProtocolError: bad zlib data or a block above MAX_HEADER_BLOCK."""
        try:
            block = self._z.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyProtocolError(f"header decompression failed: {exc}") from None
        if self._z.unconsumed_tail:
            raise SpdyProtocolError(f"header block larger than {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(block)


class FrameReader:
    """Splits the byte stream into frames: (is_control, type or stream id, flags, payload)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bool, int, int, bytes]]:
        self._buf += data
        frames, offset, buf = [], 0, self._buf
        while len(buf) - offset >= 8:
            first, second = struct.unpack_from(">II", buf, offset)
            length = second & 0xFFFFFF
            if len(buf) - offset - 8 < length:
                break
            payload = bytes(buf[offset + 8:offset + 8 + length])
            offset += 8 + length
            if first & 0x80000000:
                if (first >> 16) & 0x7FFF != VERSION:
                    raise SpdyProtocolError(f"unsupported SPDY version {(first >> 16) & 0x7FFF}")
                frames.append((True, first & 0xFFFF, second >> 24, payload))
            else:
                frames.append((False, first & 0x7FFFFFFF, second >> 24, payload))
        del buf[:offset]
        return frames


# -- session ---------------------------------------------------------------------------------


class Wire(Protocol):
    """The connection under a session."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Return once the transport's write buffer is below its high-water mark."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class SpdyStream:
    """One stream the client opened. Reads and writes are async; both ends close with FIN."""

    def __init__(
        self, session: SpdySession, stream_id: int, headers: Headers, fin: bool,
        unidirectional: bool,
    ) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.remote_closed = fin
        self.local_closed = unidirectional  # a unidirectional stream is never written to
        self.reset_status: int | None = None
        self.send_window = session.peer_initial_window
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._unacked = 0
        self._readable = asyncio.Event()

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    @property
    def finished(self) -> bool:
        return self.reset_status is not None or (self.local_closed and self.remote_closed)

    async def read(self) -> bytes:
        """The next chunk from the client; b"" once it half-closed (FIN).

        :raises ConnectionResetError: the stream was reset or the connection is gone, which is
            not an end of input (an attached container must not see EOF when a client leaves).
        """
        while not self._chunks:
            if self.remote_closed:
                return b""
            if self.reset_status is not None or self.session.closed:
                raise ConnectionResetError(f"SPDY stream {self.id} was reset or disconnected")
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self.session._consumed(self, len(chunk))
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def write(self, data: bytes) -> None:
        """Send `data` within the flow-control windows; dropped once the stream or session ended."""
        view = memoryview(data)
        while view:
            size = await self.session._acquire_window(self, min(len(view), MAX_DATA_FRAME))
            if not size:
                return
            self.session._send(data_frame(self.id, 0, bytes(view[:size])))
            view = view[size:]
            await self.session._drain()

    async def close(self) -> None:
        """Half-close our side (FIN): the client reads EOF. Idempotent."""
        if self.local_closed or self.reset_status is not None or self.session.closed:
            return
        self.local_closed = True
        self.session._send(data_frame(self.id, FLAG_FIN, b""))
        self.session._forget_if_finished(self)
        await self.session._drain()

    def reset(self, status: int = RstStatus.CANCEL) -> None:
        """Abort both directions (RST_STREAM). Idempotent."""
        if self.reset_status is not None:
            return
        self.reset_status = status
        if not self.session.closed:
            self.session._send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        self._drop_input()
        self.session._forget_if_finished(self)
        self.session._window_changed_notify()

    def _deliver(self, data: bytes, fin: bool) -> None:
        if data and self.reset_status is None:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > MAX_STREAM_BUFFER:
                self.session._hold_reading(self)
        if fin:
            self.remote_closed = True
            self.session._forget_if_finished(self)
        self._readable.set()

    def _drop_input(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        self.session._release_reading(self)
        self._readable.set()


StreamHandler = Callable[[SpdyStream], bool]


class SpdySession:
    """The server side of one SPDY/3.1 connection: the client opens every stream.

    `on_stream` is called for each new stream and returns whether to accept it: accepted streams
    get a SYN_REPLY at once, refused ones a RST_STREAM (REFUSED_STREAM).
    """

    def __init__(self, wire: Wire, on_stream: StreamHandler, name: str = "spdy") -> None:
        self.name = name
        self.peer_initial_window = DEFAULT_WINDOW
        self.streams: dict[int, SpdyStream] = {}
        self.closed = False
        self.done = asyncio.Event()  # set once the connection is gone
        self.last_activity = asyncio.get_running_loop().time()
        self._wire = wire
        self._on_stream = on_stream
        self._reader = FrameReader()
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._last_remote_id = 0
        self._goaway_sent = False
        self._goaway_received = False
        self._peer_eof = asyncio.Event()
        self._send_window = DEFAULT_WINDOW  # session-level, SPDY/3.1
        self._unacked = 0
        self._peer_flow_control = False  # True once the peer sent WINDOW_UPDATE or SETTINGS
        self._window_changed = asyncio.Event()
        self._holding: set[int] = set()
        self._discarding = False

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection."""
        if self.closed:
            return
        self.last_activity = asyncio.get_running_loop().time()
        try:
            for is_control, kind, flags, payload in self._reader.feed(data):
                if is_control:
                    self._on_control(kind, flags, payload)
                else:
                    self._on_data(kind, flags, payload)
        except (SpdyProtocolError, struct.error) as exc:
            self._fail(GOAWAY_PROTOCOL_ERROR, str(exc) or type(exc).__name__)

    def feed_eof(self) -> None:
        """The connection is gone (the peer closed it, or it broke)."""
        self._peer_eof.set()
        self._mark_closed()

    def _on_control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SYN_STREAM:
            self._on_syn_stream(flags, payload)
        elif kind in (SYN_REPLY, HEADERS):
            # Streams we never opened, or extra headers: decompress anyway to keep zlib in step.
            self._decompressor.decompress(payload[4:])
            if kind == HEADERS and flags & FLAG_FIN:
                stream = self.streams.get(_u31(payload, 0))
                if stream is not None:
                    stream._deliver(b"", True)
        elif kind == RST_STREAM:
            self._on_rst(payload)
        elif kind == SETTINGS:
            self._on_settings(payload)
        elif kind == PING:
            (ping_id,) = struct.unpack_from(">I", payload, 0)
            if ping_id % 2 == 1:  # client-initiated (odd): echo it; even ones would be ours
                self._send(control_frame(PING, 0, payload[:4]))
        elif kind == GOAWAY:
            self._goaway_received = True
        elif kind == WINDOW_UPDATE:
            self._on_window_update(payload)
        # Unknown control frames are ignored, as the spec requires.

    def _on_syn_stream(self, flags: int, payload: bytes) -> None:
        if len(payload) < 10:
            raise SpdyProtocolError("short SYN_STREAM")
        stream_id = _u31(payload, 0)
        headers = self._decompressor.decompress(payload[10:])
        if stream_id % 2 == 0 or stream_id <= self._last_remote_id:
            raise SpdyProtocolError(f"client opened stream {stream_id} out of order")
        self._last_remote_id = stream_id
        if self._goaway_sent or self._goaway_received:
            self._rst(stream_id, RstStatus.REFUSED_STREAM)
            return
        stream = SpdyStream(self, stream_id, headers, bool(flags & FLAG_FIN),
                            bool(flags & FLAG_UNIDIRECTIONAL))
        self.streams[stream_id] = stream
        try:
            accepted = self._on_stream(stream)
        except Exception:
            log.exception("stream handler failed session=%s stream=%d", self.name, stream_id)
            accepted = False
        if not accepted:
            self.streams.pop(stream_id, None)
            stream.reset_status = RstStatus.REFUSED_STREAM
            self._rst(stream_id, RstStatus.REFUSED_STREAM)
            return
        block = self._compressor.compress(())
        self._send(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + block))

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self._discarding:
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_remote_id:
                self._rst(stream_id, RstStatus.INVALID_STREAM)
            return  # late data for a stream we already finished or reset
        if stream.remote_closed:
            stream.reset(RstStatus.STREAM_ALREADY_CLOSED)
            return
        stream._deliver(payload, bool(flags & FLAG_FIN))

    def _on_rst(self, payload: bytes) -> None:
        stream = self.streams.pop(_u31(payload, 0), None)
        if stream is not None:
            stream.reset_status = struct.unpack_from(">I", payload, 4)[0] or RstStatus.CANCEL
            stream._drop_input()
            self._window_changed_notify()

    def _on_settings(self, payload: bytes) -> None:
        (count,) = struct.unpack_from(">I", payload, 0)
        for i in range(count):
            id_flags, value = struct.unpack_from(">II", payload, 4 + 8 * i)
            if id_flags & 0xFFFFFF == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                self._peer_flow_control = True
                self._window_changed_notify()

    def _on_window_update(self, payload: bytes) -> None:
        stream_id = _u31(payload, 0)
        delta = struct.unpack_from(">I", payload, 4)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self._send_window = min(self._send_window + delta, MAX_WINDOW)
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.send_window = min(stream.send_window + delta, MAX_WINDOW)
        self._peer_flow_control = True
        self._window_changed_notify()

    # -- flow control --------------------------------------------------------------------

    def _consumed(self, stream: SpdyStream, size: int) -> None:
        """`size` bytes of `stream` were read: give the peer its window back."""
        stream._unacked += size
        self._unacked += size
        if stream._unacked >= DEFAULT_WINDOW // 2 and not stream.remote_closed:
            self._send(control_frame(WINDOW_UPDATE, 0,
                                     struct.pack(">II", stream.id, stream._unacked)))
            stream._unacked = 0
        if self._unacked >= DEFAULT_WINDOW // 2:
            self._send(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", 0, self._unacked)))
            self._unacked = 0
        if stream._buffered <= MAX_STREAM_BUFFER // 2:
            self._release_reading(stream)

    async def _acquire_window(self, stream: SpdyStream, want: int) -> int:
        """How many of `want` bytes `stream` may send now (waiting for window); 0 if it ended.

        Windows are always counted, but only enforced once the peer has shown it keeps them
        (it sent a WINDOW_UPDATE or an initial window SETTING): moby/spdystream, the SPDY peer
        of every Kubernetes client, sends neither and relies on TCP back-pressure, and waiting
        for updates it never sends would stall every session after 64 KiB.
        """
        while True:
            if stream.local_closed or stream.reset_status is not None or self.closed:
                return 0
            allowed = min(want, stream.send_window, self._send_window)
            if not self._peer_flow_control:
                allowed = want
            if allowed > 0:
                stream.send_window -= allowed
                self._send_window -= allowed
                return allowed
            await self._window_changed.wait()

    def _window_changed_notify(self) -> None:
        self._window_changed.set()
        self._window_changed = asyncio.Event()

    def _hold_reading(self, stream: SpdyStream) -> None:
        # The peer keeps sending past what the consumer reads (no flow control on its side):
        # stop reading the socket so TCP pushes back, as the peer's own implementation expects.
        if not self._holding:
            self._wire.pause_reading()
        self._holding.add(stream.id)

    def _release_reading(self, stream: SpdyStream) -> None:
        if stream.id in self._holding:
            self._holding.discard(stream.id)
            if not self._holding:
                self._wire.resume_reading()

    # -- output --------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        if self.closed:
            return
        self.last_activity = asyncio.get_running_loop().time()
        self._wire.write(frame)

    async def _drain(self) -> None:
        if self.closed:
            return
        try:
            await self._wire.drain()
        except ConnectionError:
            self._mark_closed()

    def _rst(self, stream_id: int, status: int) -> None:
        self._send(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, status)))

    def _forget_if_finished(self, stream: SpdyStream) -> None:
        if stream.finished:
            self.streams.pop(stream.id, None)
            self._release_reading(stream)

    # -- ending --------------------------------------------------------------------------

    async def close(self, linger: float = LINGER) -> None:
        """GOAWAY, then give the peer `linger` seconds to close first (closing first with unread
        input would make the kernel reset the connection and the peer could lose our last
        frames), then close the connection."""
        if self.closed:
            return
        self._discarding = True
        for stream in list(self.streams.values()):
            stream._drop_input()
        if not self._goaway_sent:
            self._goaway_sent = True
            self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_remote_id,
                                                            GOAWAY_OK)))
        await self._drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._peer_eof.wait(), linger)
        self.abort()

    def abort(self) -> None:
        """Close the connection now."""
        if not self.closed:
            self._wire.close()
        self._mark_closed()

    def _fail(self, status: int, why: str) -> None:
        log.warning("closing SPDY session after a protocol error session=%s error=%s",
                    self.name, why)
        if not self._goaway_sent:
            self._goaway_sent = True
            self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_remote_id, status)))
        self.abort()

    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self.streams.values():
            stream._readable.set()
        self._window_changed_notify()
        self.done.set()


def _u31(payload: bytes, offset: int) -> int:
    try:
        return int(struct.unpack_from(">I", payload, offset)[0]) & 0x7FFFFFFF
    except struct.error:
        raise SpdyProtocolError("short control frame") from None
