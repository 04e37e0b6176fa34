"""Test helpers: build OCI images (layers as real tars) and push them to a registry with plain
aiohttp requests of the distribution API (monolithic blob uploads, manifest PUTs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "": "application/vnd.oci.image.layer.v1.tar",
}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class E:
    """One tar entry. kind: file, dir, sym, link, chr, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    xattrs: dict[str, str] = field(default_factory=dict)


def tar_bytes(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                         "link": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE,
                         "fifo": tarfile.FIFOTYPE}[e.kind]
            info.linkname = e.link
            if e.kind == "chr":
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


@dataclass
class Layer:
    tar: bytes
    compression: str = "gzip"
    blob: bytes = b""

    def __post_init__(self) -> None:
        self.blob = self.blob or compress(self.tar, self.compression)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": LAYER_MEDIA[self.compression], "digest": sha(self.blob),
                "size": len(self.blob)}


@dataclass
class Image:
    layers: list[Layer]
    config: dict[str, Any] = field(default_factory=dict)
    architecture: str = "amd64"
    docker: bool = False  # Docker schema2 media types instead of OCI

    def config_bytes(self) -> bytes:
        doc = {"architecture": self.architecture, "os": "linux", "config": self.config,
               "rootfs": {"type": "layers", "diff_ids": [sha(x.tar) for x in self.layers]}}
        return json.dumps(doc).encode()

    @property
    def id(self) -> str:
        return sha(self.config_bytes())

    def manifest_bytes(self) -> bytes:
        config = self.config_bytes()
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if self.docker else OCI_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG if self.docker else OCI_CONFIG,
                       "digest": sha(config), "size": len(config)},
            "layers": [x.descriptor() for x in self.layers],
        }
        if self.docker:
            for layer in doc["layers"]:
                layer["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
        return json.dumps(doc).encode()

    def blobs(self) -> dict[str, bytes]:
        result = {sha(x.blob): x.blob for x in self.layers}
        config = self.config_bytes()
        result[sha(config)] = config
        return result


def index_bytes(images: list[Image]) -> bytes:
    manifests = []
    for image in images:
        body = image.manifest_bytes()
        manifests.append({"mediaType": OCI_MANIFEST, "digest": sha(body), "size": len(body),
                          "platform": {"os": "linux", "architecture": image.architecture}})
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": manifests}).encode()


class Pusher:
    """Pushes to a real registry at `base` ("http://127.0.0.1:PORT") over the v2 API."""

    def __init__(self, session: aiohttp.ClientSession, base: str,
                 authorization: str | None = None) -> None:
        self.session, self.base = session, base
        self.headers = {"Authorization": authorization} if authorization else {}

    async def blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        async with self.session.head(f"{self.base}/v2/{repo}/blobs/{digest}",
                                     headers=self.headers) as resp:
            if resp.status == 200:
                return digest
        async with self.session.post(f"{self.base}/v2/{repo}/blobs/uploads/",
                                     headers=self.headers) as resp:
            assert resp.status == 202, await resp.text()
            location = resp.headers["Location"]
        url = location if location.startswith("http") else self.base + location
        sep = "&" if "?" in url else "?"
        async with self.session.put(f"{url}{sep}digest={digest}", data=data,
                                    headers={**self.headers,
                                             "Content-Type": "application/octet-stream"}) as resp:
            assert resp.status == 201, await resp.text()
        return digest

    async def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        async with self.session.put(f"{self.base}/v2/{repo}/manifests/{ref}", data=body,
                                    headers={**self.headers, "Content-Type": media_type}) as resp:
            assert resp.status == 201, await resp.text()
        return sha(body)

    async def image(self, repo: str, ref: str, image: Image) -> str:
        """Push blobs and manifest; returns the manifest digest."""
        for data in image.blobs().values():
            await self.blob(repo, data)
        media = DOCKER_MANIFEST if image.docker else OCI_MANIFEST
        return await self.manifest(repo, ref, image.manifest_bytes(), media)

    async def index(self, repo: str, ref: str, images: list[Image]) -> str:
        for image in images:
            await self.image(repo, sha(image.manifest_bytes()), image)
        return await self.manifest(repo, ref, index_bytes(images), OCI_INDEX)
