"""A tiny in-test registry (aiohttp) for what a real one cannot be made to do on demand:
bearer-token auth with our own token server, injected 5xx errors, dropped connections,
corrupt blobs, redirects to a separate blob-storage origin, and request counting."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from tests.image.oci import OCI_MANIFEST, Image, sha


@dataclass
class Faults:
    fail_first: int = 0  # 503 for this many blob requests
    drop_blob_once: bool = False  # close the connection halfway through the first blob GET
    corrupt_blobs: bool = False  # layers: same size, wrong bytes
    redirect_blobs: bool = False  # 307 to the storage origin
    token_auth: tuple[str, str] | None = None  # (user, password) the token server wants
    blob_delay: float = 0.0


@dataclass
class FakeRegistry:
    faults: Faults = field(default_factory=Faults)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    blob_gets: Counter[str] = field(default_factory=Counter)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    storage_auth_headers: list[str | None] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)
    host: str = ""
    storage: str = ""
    _runners: list[web.AppRunner] = field(default_factory=list)
    active_blobs: int = 0
    max_active_blobs: int = 0
    _dropped: bool = False
    _failed: int = 0

    def add(self, repo: str, tag: str, image: Image) -> str:
        body = image.manifest_bytes()
        self.manifests[f"{repo}/{tag}"] = (body, OCI_MANIFEST)
        self.manifests[f"{repo}/{sha(body)}"] = (body, OCI_MANIFEST)
        self.blobs.update(image.blobs())
        return sha(body)

    async def start(self) -> FakeRegistry:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get("/v2/{repo:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{repo:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._oauth_token)
        storage = web.Application()
        storage.router.add_get("/store/{digest}", self._stored)
        self.host = await self._serve(app)
        self.storage = await self._serve(storage)
        return self

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        port = runner.addresses[0][1]
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def _authorized(self, request: web.Request) -> web.Response | None:
        if self.faults.token_auth is None:
            return None
        if request.headers.get("Authorization") == "Bearer good-token":
            return None
        repo = request.match_info.get("repo", "")
        challenge = (f'Bearer realm="http://{self.host}/token",service="fake",'
                     f'scope="repository:{repo}:pull"')
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                 headers={"WWW-Authenticate": challenge})

    async def _base(self, request: web.Request) -> web.StreamResponse:
        return self._authorized(request) or web.json_response({})

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests.append(dict(request.query))
        assert self.faults.token_auth is not None
        user, password = self.faults.token_auth
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"details": "bad credentials"}, status=401)
        return web.json_response({"token": "good-token", "expires_in": 300})

    async def _oauth_token(self, request: web.Request) -> web.StreamResponse:
        """The OAuth2 refresh-token grant a CRI identity_token leads to."""
        form = await request.post()
        self.token_requests.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != "refresh-xyz":
            return web.json_response({"error": "invalid_grant"}, status=401)
        return web.json_response({"access_token": "good-token", "expires_in": 300})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        denied = self._authorized(request)
        if denied:
            return denied
        key = f"{request.match_info['repo']}/{request.match_info['ref']}"
        if key not in self.manifests:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        body, media = self.manifests[key]
        return web.Response(body=body, content_type=media)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        denied = self._authorized(request)
        if denied:
            return denied
        digest = request.match_info["digest"]
        self.blob_gets[digest] += 1
        if self._failed < self.faults.fail_first:
            self._failed += 1
            return web.Response(status=503)
        if digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if self.faults.redirect_blobs:
            raise web.HTTPTemporaryRedirect(f"http://{self.storage}/store/{digest}?sig=x")
        return await self._send_blob(request, digest)

    async def _stored(self, request: web.Request) -> web.StreamResponse:
        self.storage_auth_headers.append(request.headers.get("Authorization"))
        return await self._send_blob(request, request.match_info["digest"])

    async def _send_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        data = self.blobs[digest]
        if self.faults.corrupt_blobs and len(data) > 10_000:  # layers only, not configs
            data = bytes(len(data))
        if self.faults.blob_delay:
            self.active_blobs += 1
            self.max_active_blobs = max(self.max_active_blobs, self.active_blobs)
            try:
                await asyncio.sleep(self.faults.blob_delay)
            finally:
                self.active_blobs -= 1
        start, status = 0, 200
        if "Range" in request.headers:
            self.ranges.append(request.headers["Range"])
            start, status = int(request.headers["Range"].split("=")[1].rstrip("-")), 206
        resp = web.StreamResponse(status=status)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        if self.faults.drop_blob_once and not self._dropped and len(data) > 1000:
            self._dropped = True
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(data[start:])
        await resp.write_eof()
        return resp
