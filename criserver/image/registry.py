"""An asyncio client for the OCI distribution API v2: manifests and blobs, with mirrors, auth,
retries and redirects.

Endpoints for a registry are its configured mirrors in order, then the registry itself. HTTPS
unless the registry is loopback or listed in `insecure_registries`. Credentials are sent only to
the registry they belong to, and an Authorization header never follows a cross-host redirect.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp
from yarl import URL

from criserver.config import ImageConfig
from criserver.errors import CriError, FailedPrecondition, NotFound, Unavailable
from criserver.failpoints import crash_point
from criserver.image import manifest as mf
from criserver.image.auth import Challenge, Credentials, parse_challenge
from criserver.image.content import BlobMismatch, BlobWriter
from criserver.image.reference import DOCKER_DOMAIN, Reference

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as progress(layer digest, bytes done, bytes total) while a layer downloads."""

RETRIES = 4
BACKOFF_BASE = 0.25
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
CHUNK = 256 * 1024
TOKEN_DEFAULT_TTL = 60.0


def _network_errors() -> tuple[type[BaseException], ...]:
    # aiohttp is imported on first use: it costs an idle daemon ~12 MiB.
    import aiohttp

    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class RegistryError(Unavailable):
    """The registry could not be reached or kept failing: worth trying another endpoint."""


class AuthError(FailedPrecondition):
    """The registry refused our (lack of) credentials."""


@dataclass(frozen=True)
class Endpoint:
    url: URL  # scheme://host[:port][/prefix], without the trailing /v2
    mirror: bool

    def api(self, path: str) -> URL:
        base = str(self.url).rstrip("/")
        return URL(f"{base}/v2/{path}", encoded=False)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Token:
    header: str
    expires: float


class RegistryClient:
    """Talks to registries on behalf of pulls. One per ImageService; `close()` when done."""

    def __init__(self, config: ImageConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._own_session = session is None
        self._tokens: dict[tuple[str, str, str], _Token] = {}

    def _http(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60),
                auto_decompress=False,
                headers={"User-Agent": "criserver"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # -- endpoints -------------------------------------------------------------------------

    def endpoints(self, domain: str) -> list[Endpoint]:
        result = [self._endpoint(m, mirror=True) for m in self.config.mirrors.get(domain, [])]
        upstream = "registry-1.docker.io" if domain == DOCKER_DOMAIN else domain
        result.append(self._endpoint(upstream, mirror=False, name=domain))
        return result

    def _endpoint(self, text: str, mirror: bool, name: str = "") -> Endpoint:
        if "://" in text:
            return Endpoint(URL(text), mirror)
        host = URL(f"//{text}").host or text
        insecure = (
            _is_loopback(host)
            or text in self.config.insecure_registries
            or (name and name in self.config.insecure_registries)
        )
        return Endpoint(URL(f"{'http' if insecure else 'https'}://{text}"), mirror)

    # -- manifests -------------------------------------------------------------------------

    async def fetch_manifest(
        self, ref: Reference, reference: str, creds: Credentials | None
    ) -> tuple[bytes, str, str]:
        """GET a manifest or index by tag or digest: (bytes, media type, digest).

        :raises NotFound: no endpoint knows it. :raises AuthError, RegistryError, BlobMismatch.
        """
        result: tuple[bytes, str, str] = await self._each_endpoint(
            ref, lambda ep: self._fetch_manifest(ep, ref, reference, creds)
        )
        return result

    async def _fetch_manifest(
        self, ep: Endpoint, ref: Reference, reference: str, creds: Credentials | None
    ) -> tuple[bytes, str, str]:
        url = ep.api(f"{ref.path}/manifests/{reference}")
        resp = await self._request(ep, ref, url, creds, {"Accept": mf.ACCEPT})
        async with resp:
            if resp.status == 404:
                raise NotFound(f"image {ref}: manifest {reference} not found at {ep.url}")
            self._raise_for_status(resp, ep, f"manifest {reference}")
            length = resp.content_length
            if length is not None and length > mf.MAX_MANIFEST_BYTES:
                raise FailedPrecondition(f"image {ref}: manifest of {length} bytes is too large")
            body = await resp.content.read(mf.MAX_MANIFEST_BYTES + 1)
            if len(body) > mf.MAX_MANIFEST_BYTES:
                raise FailedPrecondition(f"image {ref}: manifest is too large")
            media_type = resp.headers.get("Content-Type", "")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise BlobMismatch(f"image {ref}: manifest {reference} has digest {digest}")
        return body, media_type, digest

    async def fetch_small_blob(
        self, ref: Reference, desc: mf.Descriptor, creds: Credentials | None
    ) -> bytes:
        """GET a small blob (an image config) into memory, verified against digest and size."""
        if desc.size > mf.MAX_MANIFEST_BYTES:
            raise FailedPrecondition(f"image {ref}: config blob of {desc.size} bytes is too large")

        async def one(ep: Endpoint) -> bytes:
            resp = await self._request(ep, ref, ep.api(f"{ref.path}/blobs/{desc.digest}"), creds)
            async with resp:
                if resp.status == 404:
                    raise NotFound(f"image {ref}: blob {desc.digest} not found at {ep.url}")
                self._raise_for_status(resp, ep, f"blob {desc.digest}")
                body = await resp.content.read(desc.size + 1)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if len(body) != desc.size or digest != desc.digest:
                raise BlobMismatch(f"image {ref}: blob {desc.digest} failed verification "
                                   f"(size {len(body)}/{desc.size}, digest {digest})")
            return body

        body: bytes = await self._each_endpoint(ref, one)
        return body

    # -- blobs -----------------------------------------------------------------------------

    async def fetch_blob(
        self,
        ref: Reference,
        desc: mf.Descriptor,
        writer: BlobWriter,
        creds: Credentials | None,
        progress: Progress | None = None,
    ) -> None:
        """Stream a blob into `writer` (resuming with Range after a dropped connection) and
        commit it; the writer verifies digest and size."""

        async def one(ep: Endpoint) -> None:
            await writer.reset()
            await self._stream_blob(ep, ref, desc, writer, creds, progress)
            await writer.commit()

        await self._each_endpoint(ref, one)

    async def _stream_blob(
        self,
        ep: Endpoint,
        ref: Reference,
        desc: mf.Descriptor,
        writer: BlobWriter,
        creds: Credentials | None,
        progress: Progress | None,
    ) -> None:
        url = ep.api(f"{ref.path}/blobs/{desc.digest}")
        for attempt in range(RETRIES):
            headers = {}
            if writer.written:
                headers["Range"] = f"bytes={writer.written}-"
            resp = await self._request(ep, ref, url, creds, headers)
            try:
                async with resp:
                    if resp.status == 404:
                        raise NotFound(f"image {ref}: blob {desc.digest} not found at {ep.url}")
                    self._raise_for_status(resp, ep, f"blob {desc.digest}")
                    if writer.written and resp.status != 206:
                        await writer.reset()  # the server ignored Range: start over
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        await writer.write(chunk)
                        crash_point("pull.layer_partial")  # a temp blob half written
                        if progress is not None:
                            progress(desc.digest, writer.written, desc.size)
                return
            except _network_errors() as exc:
                if attempt + 1 == RETRIES:
                    raise RegistryError(
                        f"image {ref}: blob {desc.digest} from {ep.url}: {_describe(exc)}"
                    ) from exc
                log.warning("blob download interrupted, resuming image=%s digest=%s "
                            "at=%d error=%s", ref, desc.digest, writer.written, _describe(exc))
                await asyncio.sleep(BACKOFF_BASE * 2**attempt)

    # -- plumbing --------------------------------------------------------------------------

    async def _each_endpoint(self, ref: Reference, fn: Callable[[Endpoint], Any]) -> Any:
        """Run fn on each endpoint in order until one succeeds; mirrors fall back upstream."""
        endpoints = self.endpoints(ref.domain)
        for i, ep in enumerate(endpoints):
            try:
                return await fn(ep)
            except (RegistryError, NotFound, AuthError, BlobMismatch) as exc:
                if i + 1 == len(endpoints):
                    raise
                log.warning("endpoint failed, trying next image=%s endpoint=%s error=%s",
                            ref, ep.url, exc.message)
        raise AssertionError("unreachable: endpoints() is never empty")

    def _raise_for_status(self, resp: aiohttp.ClientResponse, ep: Endpoint, what: str) -> None:
        if resp.status in (401, 403):
            raise AuthError(f"{what} at {ep.url}: access denied (HTTP {resp.status}); "
                            "check the pull credentials")
        if resp.status >= 400 or resp.status in (301, 302, 303, 307, 308):
            raise RegistryError(f"{what} at {ep.url}: HTTP {resp.status}")

    async def _request(
        self,
        ep: Endpoint,
        ref: Reference,
        url: URL,
        creds: Credentials | None,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """GET with auth, retries (5xx, 429, dropped connections) and safe redirects.

        The caller releases the response.
        """
        creds = None if ep.mirror else creds  # credentials belong to the upstream registry only
        scope = f"repository:{ref.path}:pull"
        key = (ep.url.host or "", scope, creds.key if creds else "")
        authenticated = False
        attempt = 0
        while True:
            request_headers = dict(headers or {})
            auth = self._auth_header(key)
            if auth:
                request_headers["Authorization"] = auth
            try:
                resp = await self._send(url, request_headers)
            except _network_errors() as exc:
                attempt += 1
                if attempt >= RETRIES:
                    raise RegistryError(f"{url.with_query(None)}: {_describe(exc)}") from exc
                await asyncio.sleep(BACKOFF_BASE * 2 ** (attempt - 1))
                continue
            if resp.status == 401 and not authenticated:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                resp.release()
                if challenge is None:
                    raise AuthError(f"{url.with_query(None)}: HTTP 401 without a challenge")
                await self._authorize(key, challenge, creds, scope, ep)
                authenticated = True
                continue
            if resp.status in RETRY_STATUSES:
                attempt += 1
                if attempt < RETRIES:
                    resp.release()
                    log.warning("registry error, retrying url=%s status=%d attempt=%d",
                                url.with_query(None), resp.status, attempt)
                    await asyncio.sleep(BACKOFF_BASE * 2 ** (attempt - 1))
                    continue
            return resp

    async def _send(self, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """One GET, following redirects ourselves so credentials never leave their host."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._http().get(url, headers=headers, allow_redirects=False)
            if resp.status not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
                return resp
            target = url.join(URL(resp.headers["Location"], encoded=True))
            resp.release()
            if url.scheme == "https" and target.scheme != "https":
                raise RegistryError(f"{url.with_query(None)}: refusing redirect to plain HTTP")
            if target.origin() != url.origin():
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise RegistryError(f"{url.with_query(None)}: too many redirects")

    def _auth_header(self, key: tuple[str, str, str]) -> str:
        token = self._tokens.get(key)
        if token is not None:
            if token.expires > time.monotonic():
                return token.header
            del self._tokens[key]
        return ""

    async def _authorize(
        self,
        key: tuple[str, str, str],
        challenge: Challenge,
        creds: Credentials | None,
        scope: str,
        ep: Endpoint,
    ) -> None:
        if challenge.scheme == "basic":
            if not creds or not creds.username:
                raise AuthError(f"{ep.url}: the registry requires credentials (basic auth)")
            self._tokens[key] = _Token(creds.basic_header(), float("inf"))
            return
        if challenge.scheme != "bearer":
            raise AuthError(f"{ep.url}: unsupported auth scheme {challenge.scheme!r}")
        if creds and creds.registry_token:
            self._tokens[key] = _Token(f"Bearer {creds.registry_token}", float("inf"))
            return
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{ep.url}: bearer challenge without a usable realm")
        service = challenge.params.get("service", "")
        scope = challenge.params.get("scope") or scope
        token, ttl = await self._fetch_token(URL(realm), service, scope, creds, ep)
        self._tokens[key] = _Token(f"Bearer {token}", time.monotonic() + ttl - 5)

    async def _fetch_token(
        self, realm: URL, service: str, scope: str, creds: Credentials | None, ep: Endpoint
    ) -> tuple[str, float]:
        if realm.scheme == "http" and not _is_loopback(realm.host or "") and creds:
            raise AuthError(f"{ep.url}: refusing to send credentials to plain-HTTP realm")
        http = self._http()
        try:
            if creds and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "service": service, "scope": scope, "client_id": "criserver"}
                ctx = http.post(realm, data=form, allow_redirects=False)
            else:
                query = {"scope": scope}
                if service:
                    query["service"] = service
                headers = {}
                if creds and creds.username:
                    headers["Authorization"] = creds.basic_header()
                ctx = http.get(realm.update_query(query), headers=headers, allow_redirects=False)
            async with ctx as resp:
                if resp.status in (401, 403):
                    raise AuthError(f"{ep.url}: token server refused the credentials "
                                    f"(HTTP {resp.status})")
                if resp.status != 200:
                    raise RegistryError(f"{ep.url}: token server answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except _network_errors() as exc:
            raise RegistryError(f"{ep.url}: token server: {_describe(exc)}") from exc
        except ValueError as exc:
            raise RegistryError(f"{ep.url}: token server sent invalid JSON") from exc
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{ep.url}: token server sent no token")
        ttl = body.get("expires_in")
        return token, float(ttl) if isinstance(ttl, int | float) and ttl > 0 else TOKEN_DEFAULT_TTL


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CriError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
