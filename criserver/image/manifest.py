"""OCI and Docker schema2 manifests, indexes and image configs: media types, parsing, checks.

Only what a pull needs is modelled: descriptors, the platform choice in an index, the layer list
(foreign / non-distributable layers are refused) and the config fields the containers use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.image.reference import is_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# IronCore OS images (criserver/image/osboot.py): asked for too, so that a registry holding one
# serves it and the caller can say what it is rather than "not found".
OSBOOT_ARTIFACTS_MANIFEST = "application/vnd.ironcore.osboot.artifacts.v1+json"
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES, OSBOOT_ARTIFACTS_MANIFEST))
# An index may name an index, once: deeper nesting is refused.
MAX_INDEX_DEPTH = 2
# Manifests are small: anything larger is hostile or broken.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

# Layer media type -> compression ("gzip", "zstd" or "" for a plain tar).
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
}
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict)
    urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise InvalidArgument(f"{what}: descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not is_digest(digest):
            raise InvalidArgument(f"{what}: unsupported or malformed digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what}: descriptor {digest} has no valid size")
        platform = data.get("platform") or {}
        urls = data.get("urls") or ()
        return cls(str(data.get("mediaType", "")), digest, size,
                   platform if isinstance(platform, dict) else {}, tuple(map(str, urls)))


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    # Highest variant the guest CPU runs: TCG's default CPU is plain x86-64 (no SSE4.2).
    variant: str = "v1"


# Preference order of variants per architecture, best first, for a given wanted variant.
_AMD64_VARIANTS = ["v4", "v3", "v2", "v1", ""]
_ARM64_VARIANTS = ["v9", "v8", ""]


def _variant_rank(platform: Platform, variant: str) -> int | None:
    """Rank (lower is better) of an index entry's variant, None when it cannot run."""
    order = {"amd64": _AMD64_VARIANTS, "arm64": _ARM64_VARIANTS}.get(platform.architecture)
    if order is None:
        return 0 if variant == platform.variant or not variant else None
    # No variant asked: the architecture's baseline (amd64 v1, arm64 v8).
    wanted = platform.variant if platform.variant in order[:-1] else order[-2]
    usable = order[order.index(wanted):]
    if variant not in usable:
        return None
    return usable.index(variant)


def select_platform(index: dict[str, Any], platform: Platform, what: str) -> Descriptor:
    """The manifest of `index` that runs on `platform`, best variant first.

    :raises FailedPrecondition: no entry matches (the message lists the platforms offered).
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise InvalidArgument(f"{what}: index has no manifests list")
    best: tuple[int, int, Descriptor] | None = None
    offered = []
    for position, entry in enumerate(entries):
        desc = Descriptor.parse(entry, what)
        p = desc.platform
        offered.append("/".join(x for x in (p.get("os"), p.get("architecture"),
                                            p.get("variant")) if x))
        if desc.media_type not in MANIFEST_TYPES and desc.media_type not in INDEX_TYPES:
            continue
        if p.get("os") != platform.os or p.get("architecture") != platform.architecture:
            continue
        rank = _variant_rank(platform, str(p.get("variant", "")))
        if rank is not None and (best is None or (rank, position) < best[:2]):
            best = (rank, position, desc)
    if best is None:
        raise FailedPrecondition(
            f"{what}: no manifest for {platform.os}/{platform.architecture} "
            f"(offered: {', '.join(offered) or 'none'})"
        )
    return best[2]


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[...": nested deeper than the parser goes
        raise InvalidArgument(f"{what}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: not a JSON object")
    return value


def media_type_of(doc: dict[str, Any], header_type: str) -> str:
    """The manifest's media type: its own field, else the Content-Type, else by shape."""
    media = doc.get("mediaType") or header_type.split(";")[0].strip()
    if media in (*MANIFEST_TYPES, *INDEX_TYPES):
        return str(media)
    if doc.get("schemaVersion") == 1 or media in DOCKER_SCHEMA1:
        return DOCKER_SCHEMA1[0]
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return str(media)


def parse_manifest(doc: dict[str, Any], what: str) -> ImageManifest:
    """The config and layers of an image manifest.

    :raises FailedPrecondition: foreign/non-distributable or unknown layer types.
    """
    config = Descriptor.parse(doc.get("config"), f"{what} config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"{what}: manifest has no layers list")
    layers = []
    for raw in raw_layers:
        layer = Descriptor.parse(raw, f"{what} layer")
        if layer.media_type in FOREIGN_LAYER_TYPES or layer.urls:
            raise FailedPrecondition(
                f"{what}: layer {layer.digest} is foreign/non-distributable "
                f"({layer.media_type}); such layers are not supported"
            )
        if layer.media_type not in LAYER_TYPES:
            raise FailedPrecondition(
                f"{what}: layer {layer.digest} has unsupported media type {layer.media_type!r}"
            )
        layers.append(layer)
    return ImageManifest(config, tuple(layers))


@dataclass(frozen=True)
class ImageConfigInfo:
    """What the containers need from the image config, plus the layer diff_ids."""

    diff_ids: tuple[str, ...]
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    stop_signal: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    os: str = ""
    architecture: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "user": self.user, "entrypoint": list(self.entrypoint), "cmd": list(self.cmd),
            "env": list(self.env), "working_dir": self.working_dir,
            "stop_signal": self.stop_signal, "exposed_ports": list(self.exposed_ports),
            "labels": dict(self.labels), "volumes": list(self.volumes),
            "os": self.os, "architecture": self.architecture,
        }


def parse_config(doc: dict[str, Any], layer_count: int, what: str) -> ImageConfigInfo:
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and is_digest(d) for d in diff_ids
    ):
        raise InvalidArgument(f"{what}: config has no valid rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise InvalidArgument(
            f"{what}: config lists {len(diff_ids)} diff_ids for {layer_count} layers"
        )
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        cfg = {}

    def strings(key: str) -> tuple[str, ...]:
        value = cfg.get(key) or ()
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    def keys(key: str) -> tuple[str, ...]:
        value = cfg.get(key) or {}
        return tuple(sorted(str(k) for k in value)) if isinstance(value, dict) else ()

    labels = cfg.get("Labels") or {}
    return ImageConfigInfo(
        diff_ids=tuple(diff_ids),
        user=str(cfg.get("User") or ""),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        env=strings("Env"),
        working_dir=str(cfg.get("WorkingDir") or ""),
        stop_signal=str(cfg.get("StopSignal") or ""),
        exposed_ports=keys("ExposedPorts"),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        volumes=keys("Volumes"),
        os=str(doc.get("os") or ""),
        architecture=str(doc.get("architecture") or ""),
    )


def uid_or_username(user: str) -> tuple[int | None, str]:
    """The config's User split the way kubelet wants it: numeric uid, or a user name."""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name
