"""Pulling an image: resolve the reference to a platform manifest, fetch config and layers
into the content store (layers in parallel, bounded), all verified against their descriptors.

Building the snapshot and the record is the caller's (`ImageService`); this module only makes
the content present. Concurrent fetches of one blob share a single download.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from criserver.errors import CriError, FailedPrecondition
from criserver.failpoints import crash_point
from criserver.flight import SingleFlight
from criserver.image import manifest as mf
from criserver.image import osboot
from criserver.image.auth import Credentials
from criserver.image.content import ContentStore
from criserver.image.reference import Reference
from criserver.image.registry import Progress, RegistryClient

log = logging.getLogger(__name__)

MAX_INDEX_DEPTH = mf.MAX_INDEX_DEPTH


@dataclass(frozen=True)
class Resolved:
    """An image whose manifest, config and layers are all in the content store."""

    index_digest: str  # "" when the reference named a manifest directly
    manifest_digest: str
    manifest: mf.ImageManifest
    config: mf.ImageConfigInfo
    content_size: int


class Puller:
    def __init__(self, client: RegistryClient, content: ContentStore,
                 platform: mf.Platform, max_concurrent: int,
                 lease: Callable[[set[str]], AbstractContextManager[None]] | None = None) -> None:
        self.client = client
        # Protects the digests of a pull in progress from a concurrent garbage collection.
        self.lease = lease or (lambda _keys: nullcontext())
        self.content = content
        self.platform = platform
        self.max_concurrent = max_concurrent
        self._blobs: SingleFlight[None] = SingleFlight()

    async def fetch(self, ref: Reference, creds: Credentials | None,
                    progress: Progress | None = None) -> Resolved:
        """Fetch everything `ref` needs for this node's platform.

        :raises NotFound, FailedPrecondition, InvalidArgument, Unavailable, Internal.
        """
        def choose(index: dict[str, Any]) -> mf.Descriptor:
            osboot.refuse_as_container(index, f"image {ref}")
            return mf.select_platform(index, self.platform, f"image {ref}")

        docs, doc, media, index_digest = await self.resolve(ref, creds, choose)
        if media in mf.DOCKER_SCHEMA1:
            raise FailedPrecondition(f"image {ref}: Docker schema 1 manifests are not supported")
        osboot.refuse_as_container(doc, f"image {ref}")
        if media not in mf.MANIFEST_TYPES:
            raise FailedPrecondition(f"image {ref}: unsupported manifest type {media!r}")
        manifest = mf.parse_manifest(doc, f"image {ref}")
        held = {d for d, _ in docs} | {manifest.config.digest} | {d.digest for d in manifest.layers}
        with self.lease(held):
            return await self._fetch_content(ref, creds, progress, docs, index_digest, manifest)

    async def resolve(self, ref: Reference, creds: Credentials | None,
                      choose: Callable[[dict[str, Any]], mf.Descriptor]
                      ) -> tuple[list[tuple[str, bytes]], dict[str, Any], str, str]:
        """Follow `ref` through at most MAX_INDEX_DEPTH indexes, `choose` picking the entry
        of each: (every document fetched as (digest, bytes), the last one parsed, its media
        type, the first index's digest or "").

        :raises FailedPrecondition: an index lies about an entry's size.
        """
        body, media_header, digest = await self.client.fetch_manifest(
            ref, ref.digest or ref.tag, creds
        )
        docs = [(digest, body)]
        doc = mf.parse_json(body, f"image {ref}")
        media = mf.media_type_of(doc, media_header)
        index_digest = ""
        for _ in range(MAX_INDEX_DEPTH):
            if media not in mf.INDEX_TYPES:
                break
            index_digest = index_digest or digest
            desc = choose(doc)
            body, media_header, digest = await self.client.fetch_manifest(ref, desc.digest, creds)
            if len(body) != desc.size:
                raise FailedPrecondition(f"image {ref}: manifest {desc.digest} has "
                                         f"{len(body)} bytes, index says {desc.size}")
            docs.append((digest, body))
            doc = mf.parse_json(body, f"image {ref} manifest {digest}")
            media = mf.media_type_of(doc, desc.media_type or media_header)
        return docs, doc, media, index_digest

    async def _fetch_content(self, ref: Reference, creds: Credentials | None,
                             progress: Progress | None, docs: list[tuple[str, bytes]],
                             index_digest: str, manifest: mf.ImageManifest) -> Resolved:
        digest = docs[-1][0]
        if self.content.has(manifest.config.digest, manifest.config.size):
            config_bytes = await self.content.read(manifest.config.digest)
        else:
            config_bytes = await self.client.fetch_small_blob(ref, manifest.config, creds)
        config = mf.parse_config(mf.parse_json(config_bytes, f"image {ref} config"),
                                 len(manifest.layers), f"image {ref}")

        await self.fetch_blobs(ref, manifest.layers, creds, progress)
        # Small documents last: an image's manifest in the store means its layers are too.
        await self.content.put(manifest.config.digest, config_bytes)
        for doc_digest, doc_body in reversed(docs):
            await self.content.put(doc_digest, doc_body)
        crash_point("pull.content_stored")  # every blob in the store, no snapshot or record
        size = sum(len(b) for _, b in docs) + len(config_bytes) + \
            sum(layer.size for layer in manifest.layers)
        return Resolved(index_digest, digest, manifest, config, size)

    async def fetch_blobs(self, ref: Reference, layers: tuple[mf.Descriptor, ...],
                          creds: Credentials | None, progress: Progress | None) -> None:
        """Download the blobs not yet in the content store, bounded and deduplicated
        (container layers here, OS image layers from criserver/image/osboot.py)."""
        limit = asyncio.Semaphore(self.max_concurrent)

        async def one(desc: mf.Descriptor) -> None:
            if self.content.has(desc.digest, desc.size):
                if progress is not None:
                    progress(desc.digest, desc.size, desc.size)
                return
            async with limit:
                await self._blobs.run(desc.digest,
                                      lambda: self._download(ref, desc, creds, progress))

        try:
            async with asyncio.TaskGroup() as group:
                for desc in {d.digest: d for d in layers}.values():
                    group.create_task(one(desc))
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None

    async def _download(self, ref: Reference, desc: mf.Descriptor, creds: Credentials | None,
                        progress: Progress | None) -> None:
        if self.content.has(desc.digest, desc.size):
            return
        log.info("layer download started image=%s digest=%s size=%d", ref, desc.digest, desc.size)
        async with self.content.writer(desc.digest, desc.size) as writer:
            await self.client.fetch_blob(ref, desc, writer, creds, progress)
        crash_point("pull.layer_stored")  # a layer committed, its image's manifest not yet
        log.info("layer downloaded image=%s digest=%s", ref, desc.digest)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling error of a failed TaskGroup: a domain error before anything else."""
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    for exc in flat:
        if isinstance(exc, CriError):
            return exc
    return flat[0]
