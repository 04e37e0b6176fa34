"""The streaming server: the HTTP endpoint behind the URLs Exec, Attach and PortForward return.

Routes `/exec/{token}`, `/attach/{token}` and `/portforward/{token}` (GET or POST, as kubelet's)
take a single-use token naming a prepared request, then serve the session over SPDY/3.1 or
WebSocket (port-forward also SPDY tunnelled in a WebSocket), whichever the client's upgrade
asks for. `serving(config)` runs it for the daemon.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from criserver.runtime.streaming import portforward, remotecommand, tunnel, upgrade, websocket
from criserver.runtime.streaming.idle import DEFAULT_CREATION_TIMEOUT, DEFAULT_IDLE_TIMEOUT
from criserver.runtime.streaming.portforward import PortForwardRequest
from criserver.runtime.streaming.remotecommand import StdioTarget
from criserver.runtime.streaming.tokens import DEFAULT_CAPACITY, DEFAULT_TTL, TokenCache

log = logging.getLogger(__name__)

PreparedRequest = StdioTarget | PortForwardRequest
SHUTDOWN_GRACE = 1.0  # seconds aiohttp gives connections at stop (sessions are ended first)


class StreamingServer:
    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        creation_timeout: float = DEFAULT_CREATION_TIMEOUT,
        token_ttl: float = DEFAULT_TTL,
        max_tokens: int = DEFAULT_CAPACITY,
    ) -> None:
        self.address = address
        self.port = port
        self.idle_timeout = idle_timeout
        self.creation_timeout = creation_timeout
        self.tokens: TokenCache[PreparedRequest] = TokenCache(token_ttl, max_tokens)
        self._sessions: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._runner: web.AppRunner | None = None

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    @property
    def base_url(self) -> str:
        host = self.address
        if ":" in host and ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def prepare(self, request: PreparedRequest) -> str:
        """A single-use URL for `request`.

        :raises ResourceExhausted: too many prepared requests are outstanding.
        """
        if isinstance(request, PortForwardRequest):
            kind = "portforward"
        else:
            kind = request.kind
        return f"{self.base_url}/{kind}/{self.tokens.insert(request)}"

    async def start(self) -> None:
        app = web.Application()
        for kind in ("exec", "attach", "portforward"):
            for method in ("GET", "POST"):
                app.router.add_route(method, f"/{kind}/{{token}}", self._handler(kind))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=SHUTDOWN_GRACE)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address, self.port)
        await site.start()
        if self.port == 0 and self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        log.info("streaming server listening url=%s", self.base_url)

    async def stop(self) -> None:
        """End running sessions (exec'd processes are killed) and stop listening."""
        if self._runner is None:
            return
        self._stopping = True
        for task in self._sessions:
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        await self._runner.cleanup()
        self._runner = None
        log.info("streaming server stopped")

    def _handler(self, kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if self._stopping:
                raise web.HTTPServiceUnavailable(text="the streaming server is stopping")
            prepared = self.tokens.consume(request.match_info["token"])
            if prepared is None or _kind(prepared) != kind:
                raise web.HTTPNotFound(text="unknown or expired streaming token")
            task = asyncio.current_task()
            assert task is not None
            self._sessions.add(task)
            try:
                return await self._serve(request, prepared)
            finally:
                self._sessions.discard(task)

        return handle

    async def _serve(self, http: web.Request, prepared: PreparedRequest) -> web.StreamResponse:
        ws = upgrade.is_websocket(http)
        if isinstance(prepared, PortForwardRequest):
            tunnelled = ws and tunnel.tunnelled_protocol(http, portforward.SPDY_PROTOCOLS)
            if tunnelled:
                return await portforward.spdy_session(http, prepared, self.idle_timeout,
                                                      self.creation_timeout,
                                                      tunnelled=tunnelled)
            if ws:
                return await portforward.websocket_session(http, prepared, self.idle_timeout)
            return await portforward.spdy_session(http, prepared, self.idle_timeout,
                                                  self.creation_timeout)
        if ws:
            return await websocket.stdio_session(http, prepared, self.idle_timeout)
        return await remotecommand.spdy_session(http, prepared, self.idle_timeout,
                                                self.creation_timeout)


def _kind(request: PreparedRequest) -> str:
    return "portforward" if isinstance(request, PortForwardRequest) else request.kind


@asynccontextmanager
async def serving(config: Any) -> AsyncIterator[StreamingServer]:
    """Run the streaming server for the daemon's lifetime. `config` is the [streaming] section:
    address and port; idle_timeout and creation_timeout (seconds) are read when present."""
    server = StreamingServer(
        config.address, config.port,
        idle_timeout=getattr(config, "idle_timeout", DEFAULT_IDLE_TIMEOUT),
        creation_timeout=getattr(config, "creation_timeout", DEFAULT_CREATION_TIMEOUT),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
