"""Streaming server benchmark: what the wire protocols cost on top of the backend.

    .venv/bin/python bench/streaming.py [--rounds 2000] [--mib 256]

1. Interactive exec round trip: one byte into `cat`'s stdin, the same byte back from its
   stdout (p50/p99), over SPDY/3.1 and over WebSocket (v5), and directly on the backend with
   in-memory streams (no protocol).
2. Port-forward throughput: a loopback TCP server sends --mib MiB; read through a SPDY
   port-forward stream (by a client keeping 64 KiB windows, and by one sending no
   WINDOW_UPDATE like moby/spdystream, kubectl's), a WebSocket port-forward channel, and
   directly on the backend.

The backend is the tests' local one (host processes, host TCP), so the numbers isolate the
server's protocol cost; in a pod the guest channel adds its own (see bench/agent_rtt.py).
Client and server share this process and its one core: real clients run elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from criserver.runtime.streaming.server import StreamingServer  # noqa: E402
from tests.runtime.streaming.conftest import (  # noqa: E402
    CONTAINER,
    POD,
    exec_url,
    port_forward_url,
)
from tests.runtime.streaming.local_backend import LocalBackend  # noqa: E402
from tests.runtime.streaming.spdy_client import SpdyClient  # noqa: E402

Roundtrip = Callable[[], Awaitable[None]]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(roundtrip: Roundtrip, rounds: int, warmup: int = 50) -> tuple[float, float]:
    for _ in range(warmup):
        await roundtrip()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await roundtrip()
        samples.append((time.perf_counter() - start) * 1000)
    return pct(samples, 0.5), pct(samples, 0.99)


class QueueSink:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def write(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    async def close(self) -> None:
        return None


async def queue_source(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (item := await queue.get()) is not None:
        yield item


async def rtt_direct(backend: LocalBackend, rounds: int) -> tuple[float, float]:
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    sink = QueueSink()
    task = asyncio.create_task(backend.exec(POD, CONTAINER, ["cat"], tty=False,
                                            stdin=queue_source(inbound), stdout=sink,
                                            stderr=None, resize=None))

    async def roundtrip() -> None:
        inbound.put_nowait(b"x")
        await sink.queue.get()

    try:
        return await measure(roundtrip, rounds)
    finally:
        inbound.put_nowait(None)
        await task


async def rtt_spdy(url: str, rounds: int, warmup: int = 50) -> tuple[float, float]:
    """1-byte round trips through `cat` exec'd at `url` (an exec URL with stdin)."""
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    await client.open_stream({"streamType": "error"})
    stdin = await client.open_stream({"streamType": "stdin"})
    stdout = await client.open_stream({"streamType": "stdout"})

    async def roundtrip() -> None:
        await stdin.write(b"x")
        await stdout.read()

    try:
        return await measure(roundtrip, rounds, warmup)
    finally:
        await client.close()


async def rtt_websocket(server: StreamingServer, backend: LocalBackend,
                        rounds: int) -> tuple[float, float]:
    async with aiohttp.ClientSession() as http, http.ws_connect(
            exec_url(server, backend, ["cat"], stdin=True),
            protocols=["v5.channel.k8s.io"]) as ws:
        await ws.receive()  # "connected"

        async def roundtrip() -> None:
            await ws.send_bytes(b"\x00x")
            await ws.receive()

        return await measure(roundtrip, rounds)


async def source_server(size: int) -> tuple[asyncio.Server, int]:
    block = b"\0" * (1 << 20)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(send, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def throughput(label: str, run: Callable[[], Awaitable[int]], size: int) -> None:
    start = time.perf_counter()
    received = await run()
    elapsed = time.perf_counter() - start
    assert received == size, (label, received)
    print(f"  {label:30s} {size / elapsed / 2**20:8.1f} MiB/s")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    size = args.mib << 20
    backend = LocalBackend()
    server = StreamingServer("127.0.0.1", 0)
    await server.start()
    try:
        print(f"interactive exec round trip, 1 byte through `cat` ({args.rounds} rounds):")
        for label, run in (("direct on the backend", rtt_direct(backend, args.rounds)),
                           ("SPDY/3.1 (v4.channel.k8s.io)", rtt_spdy(
                               exec_url(server, backend, ["cat"], stdin=True), args.rounds)),
                           ("WebSocket (v5.channel.k8s.io)", rtt_websocket(server, backend,
                                                                           args.rounds))):
            p50, p99 = await run
            print(f"  {label:30s} p50 {p50:.3f} ms  p99 {p99:.3f} ms")

        srv, port = await source_server(size)
        print(f"port-forward throughput, {args.mib} MiB from a loopback TCP server:")

        async def direct() -> int:
            sink = CountingSink()
            await backend.port_forward(POD, port, inbound=_empty(), outbound=sink)
            return sink.count

        async def spdy(flow_control: bool = True) -> int:
            client = await SpdyClient.connect(port_forward_url(server, backend),
                                              ["portforward.k8s.io"], flow_control=flow_control)
            headers = {"port": str(port), "requestID": "0"}
            error = await client.open_stream({**headers, "streamType": "error"})
            await error.close()
            data = await client.open_stream({**headers, "streamType": "data"})
            count = 0
            while chunk := await data.read():
                count += len(chunk)
            await client.close()
            return count

        async def ws() -> int:
            count = 0
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    port_forward_url(server, backend) + f"?port={port}",
                    protocols=["v4.channel.k8s.io"], max_msg_size=0) as sock:
                await sock.receive()
                await sock.receive()
                async for message in sock:
                    if message.type != aiohttp.WSMsgType.BINARY:
                        break
                    if message.data[0] == 0:
                        count += len(message.data) - 1
                    if count >= size:
                        break
            return count

        async def spdy_tcp_only() -> int:
            return await spdy(flow_control=False)

        for label, fn in (("direct on the backend", direct),
                          ("SPDY/3.1, 64 KiB windows", spdy),
                          ("SPDY/3.1, no WINDOW_UPDATE", spdy_tcp_only),
                          ("WebSocket (v4)", ws)):
            await throughput(label, fn, size)
        srv.close()
    finally:
        await server.stop()


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    async def write(self, data: bytes) -> None:
        self.count += len(data)

    async def close(self) -> None:
        return None


async def _empty() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()  # the client never sends: like a download
    yield b""


if __name__ == "__main__":
    asyncio.run(main())
