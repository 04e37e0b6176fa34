"""The test OS's serial console, typed into like a terminal: over QEMU's console socket, or over
an Exec URL (WebSocket, v5). Each command's output is framed by numbered marker lines, so an
echo, a redrawn prompt or output left from before is never mistaken for it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

V5 = "v5.channel.k8s.io"
# Terminal queries and colours the guest's line editor writes around its prompt.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Console:
    def __init__(self, send: Callable[[bytes], Awaitable[None]],
                 receive: Callable[[], Awaitable[bytes]]) -> None:
        self._send, self._receive = send, receive
        self._count = 0

    @classmethod
    def unix(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Console:
        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def receive() -> bytes:
            data = await reader.read(4096)
            assert data, "the console closed"
            return data

        return cls(send, receive)

    @classmethod
    def websocket(cls, ws: aiohttp.ClientWebSocketResponse) -> Console:
        async def send(data: bytes) -> None:
            await ws.send_bytes(b"\x00" + data)  # stdin

        async def receive() -> bytes:
            while True:
                message = await ws.receive()
                assert message.type == aiohttp.WSMsgType.BINARY, message
                if message.data[0] == 1:  # stdout
                    return bytes(message.data[1:])

        return cls(send, receive)

    async def run(self, command: str, max_wait: float = 30.0) -> str:
        """What `command` printed."""
        self._count += 1
        begin, end = f"@@{self._count}<", f"@@{self._count}>"
        await self._send(f"echo '{begin}'; {command}; echo '{end}'\n".encode())
        # The end marker may follow output that has no newline of its own; the typed line's
        # echo never matches (a quote follows each marker there).
        framed = re.compile(rf"^{re.escape(begin)}\n(.*?){re.escape(end)}$", re.M | re.S)
        seen = ""
        async with asyncio.timeout(max_wait):
            while True:
                seen += (await self._receive()).decode(errors="replace")
                found = framed.search(ESCAPES.sub("", seen).replace("\r", ""))
                if found:
                    return found.group(1).strip()

    async def until(self, command: str, want: str, max_wait: float = 30.0,
                    interval: float = 0.5) -> None:
        deadline = asyncio.get_running_loop().time() + max_wait
        while (got := await self.run(command)) != want:
            assert asyncio.get_running_loop().time() < deadline, \
                f"{command}: {got!r}, not {want!r}"
            await asyncio.sleep(interval)


async def wait_for_log(log: Path, text: str, max_wait: float = 90.0) -> str:
    """The console log once `text` is in it."""
    deadline = asyncio.get_running_loop().time() + max_wait
    while True:
        data = (await asyncio.to_thread(log.read_bytes)).decode(errors="replace")
        if text in data:
            return data
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no {text!r} on the console: {data[-1500:]}")
        await asyncio.sleep(0.2)
