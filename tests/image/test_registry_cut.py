"""The real docker-registry behind a proxy that cuts blob downloads mid-stream (after a set
number of bytes the connection is closed): a cut once is resumed with Range, a registry that
always cuts fails the pull with nothing of it stored, and the same pull works once it heals."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from criserver.errors import Unavailable
from criserver.image import ImageService
from criserver.image.content import TMP_PREFIX
from tests.image.conftest import Registry, ServiceFactory, free_port
from tests.image.oci import E, Image, Layer, Pusher, sha, tar_bytes

pytestmark = pytest.mark.registry

CUT_AFTER = 100_000
FORWARDED = ("Content-Type", "Content-Length", "Content-Range", "Docker-Content-Digest",
             "Accept-Ranges", "Location", "WWW-Authenticate")


@dataclass
class CuttingProxy:
    host: str
    cuts_left: int = 0  # blob responses still to cut; -1: every one
    cut: int = 0  # responses cut so far


@pytest.fixture
async def proxy(registry: Registry) -> AsyncIterator[CuttingProxy]:
    state = CuttingProxy(f"127.0.0.1:{free_port()}")
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k in ("Accept", "Range")}
        async with session.request(request.method, f"{registry.base}{request.path_qs}",
                                   headers=headers, allow_redirects=True) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k in FORWARDED})
            await response.prepare(request)
            cutting = "/blobs/" in request.path and state.cuts_left != 0 \
                and request.method == "GET"
            sent = 0
            async for chunk in upstream.content.iter_chunked(16 * 1024):
                if cutting and sent + len(chunk) > CUT_AFTER:
                    await response.write(chunk[:CUT_AFTER - sent])
                    state.cuts_left -= state.cuts_left > 0
                    state.cut += 1
                    assert request.transport is not None
                    request.transport.close()  # mid-stream, Content-Length unmet
                    return response
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(state.host.rsplit(":", 1)[1]))
    await site.start()
    try:
        yield state
    finally:
        await runner.cleanup()
        await session.close()


def big_image() -> Image:
    return Image([Layer(tar_bytes([E("big", data=os.urandom(600_000))]), "")])


def _leftovers(service: ImageService) -> list[str]:
    return [p for p in os.listdir(service.content.dir) if p.startswith(TMP_PREFIX)]


async def test_a_layer_cut_once_is_resumed(make_service: ServiceFactory, registry: Registry,
                                           proxy: CuttingProxy) -> None:
    image = big_image()
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("cut/once", "v1", image)
    service: ImageService = await make_service()
    proxy.cuts_left = 1
    assert await service.pull(f"{proxy.host}/cut/once:v1") == image.id
    assert proxy.cut == 1
    assert service.content.has(sha(image.layers[0].blob), len(image.layers[0].blob))
    assert _leftovers(service) == []


async def test_a_registry_that_always_cuts_fails_the_pull_and_stores_nothing(
        make_service: ServiceFactory, registry: Registry, proxy: CuttingProxy) -> None:
    image = big_image()
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("cut/always", "v1", image)
    service: ImageService = await make_service()
    ref = f"{proxy.host}/cut/always:v1"
    proxy.cuts_left = -1
    with pytest.raises(Unavailable):
        await service.pull(ref)
    assert proxy.cut >= 2  # resumed, cut again
    assert _leftovers(service) == []
    assert service.content.digests() == set()  # not even the manifest: stored last
    assert service.get(ref) is None
    proxy.cuts_left = 0  # healed: the same pull works
    assert await service.pull(ref) == image.id
    assert _leftovers(service) == []
