"""Reading OCI image layouts (a directory or a .tar of one) for `criserver image import`.

Every document is verified against its digest; the platform manifest is chosen as for a pull;
layers are copied into the content store through the same verifying writer as downloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from criserver.errors import InvalidArgument, NotFound
from criserver.failpoints import crash_point
from criserver.image import manifest as mf
from criserver.image.content import ContentStore
from criserver.image.pull import Resolved
from criserver.image.reference import parse

CHUNK = 1024 * 1024


@dataclass
class LayoutImage:
    name: str  # a full reference from the annotations, or ""
    top_digest: str
    index_digest: str
    manifest_digest: str
    manifest: mf.ImageManifest
    config: mf.ImageConfigInfo
    docs: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def blobs(self) -> list[str]:
        return [d for d, _ in self.docs] + [layer.digest for layer in self.manifest.layers]


class _Source:
    """Blob files of a layout, from a directory or an uncompressed/gzip tar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            self.tar = tarfile.open(path, "r:*")
            for member in self.tar.getmembers():
                if member.isreg():
                    self.members[member.name.removeprefix("./")] = member

    def open(self, rel: str) -> IO[bytes]:
        if self.tar is None:
            target = (self.path / rel).resolve()
            if not target.is_relative_to(self.path.resolve()):
                raise InvalidArgument(f"{self.path}: {rel} points outside the layout")
            try:
                return open(target, "rb")
            except FileNotFoundError:
                raise NotFound(f"{self.path}: {rel} is missing") from None
        member = self.members.get(rel)
        handle = self.tar.extractfile(member) if member is not None else None
        if handle is None:
            raise NotFound(f"{self.path}: {rel} is missing from the archive")
        return handle

    def read_doc(self, rel: str, digest: str | None = None, size: int | None = None) -> bytes:
        with self.open(rel) as f:
            data = f.read(mf.MAX_MANIFEST_BYTES + 1)
        if len(data) > mf.MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"{self.path}: {rel} is too large")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and (actual != digest or (size is not None and len(data) != size)):
            raise InvalidArgument(f"{self.path}: {rel} does not match its descriptor")
        return data

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _blob(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def _image_name(annotations: dict[str, Any]) -> str:
    for key in ("io.containerd.image.name", "org.opencontainers.image.ref.name"):
        value = annotations.get(key)
        if isinstance(value, str) and "/" in value:
            try:
                return str(parse(value))
            except InvalidArgument:
                continue
    return ""


def _scan(source: _Source, platform: mf.Platform) -> list[LayoutImage]:
    layout = mf.parse_json(source.read_doc("oci-layout"), f"{source.path}: oci-layout")
    if "imageLayoutVersion" not in layout:
        raise InvalidArgument(f"{source.path}: not an OCI image layout (oci-layout)")
    index = mf.parse_json(source.read_doc("index.json"), f"{source.path}: index.json")
    images = []
    for raw in index.get("manifests") or []:
        top = mf.Descriptor.parse(raw, f"{source.path}: index.json")
        name = _image_name(raw.get("annotations") or {}) if isinstance(raw, dict) else ""
        p = top.platform
        if p and (p.get("os"), p.get("architecture")) != (platform.os, platform.architecture):
            continue  # a layout listing per-platform manifests: keep ours only
        desc, docs, index_digest = top, [], ""
        for _ in range(3):
            body = source.read_doc(_blob(desc.digest), desc.digest, desc.size)
            docs.append((desc.digest, body))
            doc = mf.parse_json(body, f"{source.path}: {desc.digest}")
            media = mf.media_type_of(doc, desc.media_type)
            if media not in mf.INDEX_TYPES:
                break
            index_digest = index_digest or desc.digest
            desc = mf.select_platform(doc, platform, f"{source.path}: {desc.digest}")
        manifest = mf.parse_manifest(doc, f"{source.path}: {desc.digest}")
        config_bytes = source.read_doc(_blob(manifest.config.digest), manifest.config.digest,
                                       manifest.config.size)
        config = mf.parse_config(mf.parse_json(config_bytes, "config"), len(manifest.layers),
                                 f"{source.path}: {desc.digest}")
        docs.append((manifest.config.digest, config_bytes))
        images.append(LayoutImage(name, top.digest, index_digest, desc.digest, manifest,
                                  config, docs))
    return images


class Layout:
    def __init__(self, source: _Source, images: list[LayoutImage]) -> None:
        self.source = source
        self.images = images

    async def copy_into(self, image: LayoutImage, content: ContentStore,
                        platform: mf.Platform) -> Resolved:
        for layer in image.manifest.layers:
            if content.has(layer.digest, layer.size):
                continue
            handle = await asyncio.to_thread(self.source.open, _blob(layer.digest))
            try:
                async with content.writer(layer.digest, layer.size) as writer:
                    while chunk := await asyncio.to_thread(handle.read, CHUNK):
                        await writer.write(chunk)
                        crash_point("import.layer_partial")  # a temp blob written, not committed
                    await writer.commit()
                crash_point("import.layer_stored")  # a layer committed, no manifest
            finally:
                handle.close()
        for digest, body in reversed(image.docs):
            await content.put(digest, body)
        size = sum(len(b) for _, b in image.docs) + sum(x.size for x in image.manifest.layers)
        return Resolved(image.index_digest, image.manifest_digest, image.manifest,
                        image.config, size)


@asynccontextmanager
async def read_layout(path: Path, platform: mf.Platform) -> AsyncIterator[Layout]:
    """Open and scan a layout. :raises NotFound, InvalidArgument: missing or malformed."""
    if not await asyncio.to_thread(path.exists):
        raise NotFound(f"{path}: no such image layout")
    try:
        source = await asyncio.to_thread(_Source, path)
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgument(f"{path}: cannot read the archive: {exc}") from exc
    try:
        images = await asyncio.to_thread(_scan, source, platform)
        yield Layout(source, images)
    finally:
        await asyncio.to_thread(source.close)

