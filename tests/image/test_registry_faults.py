"""Registry client behaviour a real registry cannot be made to show on demand: bearer tokens,
5xx retries, dropped connections, corrupt blobs, cross-host redirects, single-flight."""

from __future__ import annotations

import asyncio
import os

import pytest

from criserver.errors import FailedPrecondition
from criserver.image import ImageService
from criserver.image.auth import Credentials
from criserver.image.content import BlobMismatch
from tests.image.conftest import ServiceFactory
from tests.image.fakeregistry import FakeRegistry, Faults
from tests.image.oci import E, Image, Layer, sha, tar_bytes


def two_layer_image(size: int = 300_000) -> Image:
    return Image([Layer(tar_bytes([E("a", data=os.urandom(size))]), "gzip"),
                  Layer(tar_bytes([E("b", data=os.urandom(size))]), "zstd")])


async def test_bearer_token_flow(service: ImageService, fake: FakeRegistry) -> None:
    fake.faults = Faults(token_auth=("alice", "pw"))
    image = two_layer_image()
    fake.add("team/app", "v1", image)
    ref = f"{fake.host}/team/app:v1"
    with pytest.raises(FailedPrecondition, match="token server refused"):
        await service.pull(ref)
    assert await service.pull(ref, Credentials("alice", "pw")) == image.id
    assert fake.token_requests[-1] == {"scope": "repository:team/app:pull", "service": "fake"}
    # The token is cached: one token request for the whole successful pull.
    assert len(fake.token_requests) == 2


async def test_5xx_is_retried(service: ImageService, fake: FakeRegistry) -> None:
    fake.faults = Faults(fail_first=2)
    image = two_layer_image()
    fake.add("r", "v1", image)
    assert await service.pull(f"{fake.host}/r:v1") == image.id
    assert sum(fake.blob_gets.values()) >= len(image.blobs()) + 2


async def test_dropped_connection_resumes_with_range(service: ImageService,
                                                     fake: FakeRegistry) -> None:
    fake.faults = Faults(drop_blob_once=True)
    image = two_layer_image(2_000_000)
    fake.add("r", "v1", image)
    assert await service.pull(f"{fake.host}/r:v1") == image.id
    assert len(fake.ranges) == 1 and fake.ranges[0].startswith("bytes=")
    for layer in image.layers:
        assert service.content.path(sha(layer.blob)).read_bytes() == layer.blob


async def test_corrupt_blob_is_refused_and_not_stored(service: ImageService,
                                                      fake: FakeRegistry) -> None:
    fake.faults = Faults(corrupt_blobs=True)
    image = two_layer_image()
    fake.add("r", "v1", image)
    with pytest.raises(BlobMismatch):
        await service.pull(f"{fake.host}/r:v1")
    assert service.content.digests() == set()
    assert [p for p in os.listdir(service.content.dir)] == []


async def test_redirect_to_storage_drops_authorization(service: ImageService,
                                                       fake: FakeRegistry) -> None:
    fake.faults = Faults(token_auth=("alice", "pw"), redirect_blobs=True)
    image = two_layer_image()
    fake.add("r", "v1", image)
    assert await service.pull(f"{fake.host}/r:v1", Credentials("alice", "pw")) == image.id
    assert fake.storage_auth_headers and set(fake.storage_auth_headers) == {None}


async def test_same_image_twice_at_once_downloads_once(make_service: ServiceFactory,
                                                       fake: FakeRegistry) -> None:
    fake.faults = Faults(blob_delay=0.2)
    image = two_layer_image()
    fake.add("r", "v1", image)
    digest = fake.add("r", "v1", image)
    svc = await make_service()
    ids = await asyncio.gather(svc.pull(f"{fake.host}/r:v1"),
                               svc.pull(f"{fake.host}/r:v1"),
                               svc.pull(f"{fake.host}/r@{digest}"))
    assert set(ids) == {image.id}
    for layer in image.layers:
        assert fake.blob_gets[sha(layer.blob)] == 1


async def test_one_waiter_cancelled_other_completes(service: ImageService,
                                                    fake: FakeRegistry) -> None:
    fake.faults = Faults(blob_delay=0.3)
    image = two_layer_image()
    fake.add("r", "v1", image)
    first = asyncio.ensure_future(service.pull(f"{fake.host}/r:v1"))
    second = asyncio.ensure_future(service.pull(f"{fake.host}/r:v1"))
    await asyncio.sleep(0.1)
    first.cancel()
    assert await second == image.id
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_deadline_leaves_nothing_behind(service: ImageService,
                                              fake: FakeRegistry) -> None:
    fake.faults = Faults(blob_delay=5)
    image = two_layer_image()
    fake.add("r", "v1", image)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await service.pull(f"{fake.host}/r:v1")
    assert service.content.digests() == set()
    assert os.listdir(service.content.dir) == []
    assert service.images() == []


async def test_identity_token_and_registry_token(service: ImageService,
                                                 fake: FakeRegistry) -> None:
    fake.faults = Faults(token_auth=("nobody", "-"))
    image = two_layer_image()
    fake.add("r", "v1", image)
    assert await service.pull(f"{fake.host}/r:v1", Credentials(identity_token="refresh-xyz")) \
        == image.id
    assert fake.token_requests[-1]["grant_type"] == "refresh_token"
    assert fake.token_requests[-1]["scope"] == "repository:r:pull"
    other = two_layer_image()
    fake.add("r", "v2", other)
    requests = len(fake.token_requests)
    assert await service.pull(f"{fake.host}/r:v2", Credentials(registry_token="good-token")) \
        == other.id
    assert len(fake.token_requests) == requests  # used as is, no token request


async def test_layer_downloads_are_bounded(make_service: ServiceFactory,
                                           fake: FakeRegistry) -> None:
    from criserver.config import ImageConfig

    fake.faults = Faults(blob_delay=0.2)
    image = Image([Layer(tar_bytes([E(f"f{i}", data=os.urandom(20_000))]), "gzip")
                   for i in range(6)])
    fake.add("r", "v1", image)
    svc = await make_service(config=ImageConfig(max_concurrent_downloads=2))
    assert await svc.pull(f"{fake.host}/r:v1") == image.id
    # The config blob is fetched alone first; then at most two layers at a time.
    assert fake.max_active_blobs == 2
