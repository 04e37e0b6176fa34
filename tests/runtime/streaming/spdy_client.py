"""A SPDY/3.1 client for the tests, written from the draft independently of the server's code
(only the compression dictionary is shared, and a test checks it against its published size and
checksum). It opens streams like client-go's remotecommand and port-forward clients do.

`flow_control=True` makes it a strict peer: it keeps the server's windows and announces itself
with a session WINDOW_UPDATE; False behaves like moby/spdystream (no WINDOW_UPDATE at all).
`connect_tunnelled` runs the same client inside a WebSocket, as client-go's port-forward over
WebSocket does (subprotocol `SPDY/3.1+portforward.k8s.io`, the bytes in binary messages).
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from urllib.parse import urlsplit

import aiohttp

from criserver.runtime.streaming.spdy import DICTIONARY

WINDOW = 65536


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8003, kind, (flags << 24) | len(payload)) + payload


class ClientStream:
    def __init__(self, client: SpdyClient, stream_id: int) -> None:
        self.client = client
        self.id = stream_id
        self.replied = asyncio.Event()
        self.data = bytearray()
        self.remote_fin = asyncio.Event()
        self.reset_status: int | None = None
        self.send_window = WINDOW
        self._arrived = asyncio.Event()
        self._consumed = 0

    async def write(self, data: bytes, fin: bool = False) -> None:
        view = memoryview(data)
        while view or fin:
            size = len(view)
            if self.client.flow_control:
                while min(self.send_window, self.client.send_window) <= 0:
                    await self.client.window_event.wait()
                    self.client.window_event.clear()
                size = min(size, self.send_window, self.client.send_window)
            chunk, view = bytes(view[:size]), view[size:]
            last = fin and not view
            self.send_window -= len(chunk)
            self.client.send_window -= len(chunk)
            self.client.writer.write(struct.pack(">II", self.id, (int(last) << 24) | len(chunk))
                                     + chunk)
            await self.client.writer.drain()
            if last:
                return

    async def close(self) -> None:
        await self.write(b"", fin=True)

    def reset(self, status: int = 5) -> None:
        self.client.writer.write(_control(3, 0, struct.pack(">II", self.id, status)))

    async def read(self) -> bytes:
        """Whatever arrived since the last read (waiting for something), b"" at FIN/reset."""
        while not self.data and not self.remote_fin.is_set():
            self._arrived.clear()
            await self._arrived.wait()
        chunk = bytes(self.data)
        self.data.clear()
        self.consume(len(chunk))
        return chunk

    async def read_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
        return bytes(out)

    def consume(self, size: int) -> None:
        if not self.client.flow_control or not size:
            return
        self._consumed += size
        if self._consumed >= WINDOW // 2:
            self.client.writer.write(_control(9, 0, struct.pack(">II", self.id, self._consumed)))
            self.client.writer.write(_control(9, 0, struct.pack(">II", 0, self._consumed)))
            self._consumed = 0


class SpdyClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 flow_control: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.flow_control = flow_control
        self.status = 0
        self.headers: dict[str, list[str]] = {}
        self.body = b""
        self.streams: dict[int, ClientStream] = {}
        self.pings: dict[int, asyncio.Future[None]] = {}
        self.goaway: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        self.send_window = WINDOW
        self.window_event = asyncio.Event()
        self.auto_read = True  # False: stop reading the socket (a stalled client)
        self._next_id = 1
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15,
                                         zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, protocols: list[str] | None = None,
                      flow_control: bool = True, upgrade: str = "SPDY/3.1") -> SpdyClient:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        client = cls(reader, writer, flow_control)
        lines = [f"POST {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}",
                 "Connection: Upgrade", f"Upgrade: {upgrade}", "Content-Length: 0"]
        lines += [f"X-Stream-Protocol-Version: {p}" for p in (protocols or [])]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        client.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                client.headers.setdefault(name.strip().lower(), []).append(value.strip())
        if client.status != 101:
            length = int(client.headers.get("content-length", ["0"])[0])
            client.body = await reader.readexactly(length) if length else b""
            writer.close()
            return client
        if flow_control:  # announce that we keep windows, as a strict SPDY/3.1 peer would
            writer.write(_control(9, 0, struct.pack(">II", 0, 1024 * 1024)))
        client._task = asyncio.create_task(client._read_loop())
        return client

    @classmethod
    async def connect_tunnelled(cls, url: str, protocols: list[str], flow_control: bool = True,
                                split: int = 0) -> SpdyClient:
        """The client in a WebSocket offering `SPDY/3.1+P` for each of `protocols`; `split`
        cuts what it sends into messages of that many bytes (frames split anywhere)."""
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(url.replace("http://", "ws://", 1),
                                       protocols=[f"SPDY/3.1+{p}" for p in protocols])
        except BaseException:
            await http.close()
            raise
        reader = asyncio.StreamReader()
        writer = _WebSocketWriter(http, ws, reader, split)
        client = cls(reader, writer, flow_control)  # type: ignore[arg-type]
        client.status = 101
        client.headers = {"sec-websocket-protocol": [ws.protocol or ""]}
        if flow_control:
            writer.write(_control(9, 0, struct.pack(">II", 0, 1024 * 1024)))
        client._task = asyncio.create_task(client._read_loop())
        return client

    async def open_stream(self, headers: dict[str, str], wait_reply: bool = True) -> ClientStream:
        stream_id, self._next_id = self._next_id, self._next_id + 2
        stream = ClientStream(self, stream_id)
        self.streams[stream_id] = stream
        block = struct.pack(">I", len(headers))
        for name, value in headers.items():
            raw_name, raw_value = name.lower().encode(), value.encode()
            block += struct.pack(">I", len(raw_name)) + raw_name
            block += struct.pack(">I", len(raw_value)) + raw_value
        compressed = self._deflate.compress(block) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.writer.write(_control(1, 0, struct.pack(">IIBB", stream_id, 0, 0, 0) + compressed))
        await self.writer.drain()
        if wait_reply:
            await asyncio.wait_for(self._replied_or_reset(stream), 10)
        return stream

    async def _replied_or_reset(self, stream: ClientStream) -> None:
        while not stream.replied.is_set() and stream.reset_status is None:
            await asyncio.sleep(0.005)

    async def ping(self, ping_id: int = 1) -> None:
        future = asyncio.get_running_loop().create_future()
        self.pings[ping_id] = future
        self.writer.write(_control(6, 0, struct.pack(">I", ping_id)))
        await asyncio.wait_for(future, 10)

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
        if isinstance(self.writer, _WebSocketWriter):
            await self.writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                while not self.auto_read:
                    await asyncio.sleep(0.01)
                head = await self.reader.readexactly(8)
                first, second = struct.unpack(">II", head)
                flags, length = second >> 24, second & 0xFFFFFF
                payload = await self.reader.readexactly(length)
                if first & 0x80000000:
                    self._control(first & 0xFFFF, flags, payload)
                else:
                    stream = self.streams.get(first & 0x7FFFFFFF)
                    if stream is None:
                        continue
                    stream.data += payload
                    if flags & 1:
                        stream.remote_fin.set()
                    stream._arrived.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            for stream in self.streams.values():
                stream.remote_fin.set()
                stream._arrived.set()

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == 2:  # SYN_REPLY
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            self._inflate.decompress(payload[4:])
            self.streams[stream_id].replied.set()
        elif kind == 3:  # RST_STREAM
            stream_id, status = struct.unpack(">II", payload)
            if (stream := self.streams.get(stream_id & 0x7FFFFFFF)) is not None:
                stream.reset_status = status
                stream.remote_fin.set()
                stream._arrived.set()
        elif kind == 6:  # PING
            ping_id = struct.unpack(">I", payload)[0]
            if ping_id in self.pings:
                self.pings.pop(ping_id).set_result(None)
        elif kind == 7:  # GOAWAY
            if not self.goaway.done():
                self.goaway.set_result(struct.unpack(">II", payload))
        elif kind == 9:  # WINDOW_UPDATE
            stream_id, delta = struct.unpack(">II", payload)
            if stream_id == 0:
                self.send_window += delta
            elif (stream := self.streams.get(stream_id)) is not None:
                stream.send_window += delta
            self.window_event.set()
        elif kind in (1, 8):
            self._inflate.decompress(payload[4 if kind == 8 else 10:])


class _WebSocketWriter:
    """The StreamWriter calls SpdyClient makes, over a WebSocket's binary messages; it also
    feeds the client's StreamReader with the messages received."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 reader: asyncio.StreamReader, split: int) -> None:
        self.ws = ws
        self._http = http
        self._split = split
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._send()),
                       asyncio.create_task(self._receive(reader))]

    def write(self, data: bytes) -> None:
        step = self._split or len(data) or 1
        for i in range(0, len(data), step):
            self._queue.put_nowait(bytes(data[i:i + step]))

    async def drain(self) -> None:
        await self._queue.join()

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def _send(self) -> None:
        try:
            while (message := await self._queue.get()) is not None:
                try:
                    await self.ws.send_bytes(message)
                except ConnectionError:
                    pass
                self._queue.task_done()
            self._queue.task_done()
        finally:
            await self.ws.close()
            await self._http.close()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            async for message in self.ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                reader.feed_data(message.data)
        finally:
            reader.feed_eof()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
