"""IronCore OS images (ironcore-image OCI-SPEC): what a machine boots, pulled beside container
images but never unpacked as a root filesystem. Recognised by the osboot config and layer media
types, whatever the manifest's own type (an osboot artifacts manifest in an OCI index, or a plain
OCI image manifest, as Debian's docker-registry stores it).

This module owns the format: recognising, choosing the platform, refusing what does not fit, and
fetching the blobs through the Puller (so mirrors, auth and verification apply). The records and
their users are the image service's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.image import manifest as mf
from criserver.image.auth import Credentials
from criserver.image.reference import Reference
from criserver.image.registry import Progress
from criserver.store.images import ImageRecord, LayerRecord

if TYPE_CHECKING:
    from criserver.image.pull import Puller

log = logging.getLogger(__name__)

ARTIFACTS_MANIFEST = mf.OSBOOT_ARTIFACTS_MANIFEST
CONFIG = "application/vnd.ironcore.osboot.config.v1+json"
DISK = "application/vnd.ironcore.osboot.disk.img"
KERNEL = "application/vnd.ironcore.osboot.kernel"
INITRAMFS = "application/vnd.ironcore.osboot.initramfs"
SQUASHFS = "application/vnd.ironcore.osboot.squashfs"
LAYER_ROLES = {DISK: "disk", KERNEL: "kernel", INITRAMFS: "initramfs", SQUASHFS: "squashfs"}
# Manifest types an OS image's platform manifest may have.
MANIFEST_TYPES = (ARTIFACTS_MANIFEST, mf.OCI_MANIFEST)
# The osboot config holds a kernel command line and little else.
MAX_CONFIG_BYTES = 64 * 1024
# ImageRecord.extra["kind"] of an OS image record.
KIND = "osboot"


@dataclass(frozen=True)
class OsImage:
    """A pulled OS image: its blobs are in the content store, read-only, as long as the image
    is (a machine using it marks it with `ImageService.use_os_image`)."""

    id: str  # the platform manifest's digest (configs need not differ between OS images)
    ref: str  # the normalised reference pulled, "host/repo:tag" or "host/repo@digest"
    image_ref: str  # "host/repo@<index or manifest digest>": IRI's status.image_ref
    digest: str  # the digest `image_ref` names
    kernel: Path | None
    initramfs: Path | None
    disk: Path | None  # the disk.img blob (raw or qcow2; the disk code decides)
    squashfs: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    size: int = 0  # bytes of content: manifests, config and layers

    @property
    def command_line(self) -> str:
        """The kernel command line the image asks for ("" when none)."""
        value = self.config.get("commandLine", "")
        return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class OsManifest:
    config: mf.Descriptor
    layers: dict[str, mf.Descriptor]  # role ("disk", "kernel", ...) -> blob


@dataclass(frozen=True)
class ResolvedOs:
    index_digest: str
    manifest_digest: str
    manifest: OsManifest
    config: dict[str, Any]
    config_bytes: bytes
    content_size: int


def is_os_manifest(doc: dict[str, Any]) -> bool:
    """Whether a manifest document is an OS image: osboot config or any osboot layer."""
    config = doc.get("config")
    if isinstance(config, dict) and config.get("mediaType") == CONFIG:
        return True
    if doc.get("artifactType") == CONFIG or doc.get("mediaType") == ARTIFACTS_MANIFEST:
        return True
    layers = doc.get("layers")
    return isinstance(layers, list) and any(
        isinstance(layer, dict) and str(layer.get("mediaType")) in LAYER_ROLES for layer in layers)


def is_os_index(doc: dict[str, Any]) -> bool:
    """Whether an index lists osboot artifacts manifests (and so is an OS image)."""
    entries = doc.get("manifests")
    return isinstance(entries, list) and any(
        isinstance(e, dict) and e.get("mediaType") == ARTIFACTS_MANIFEST for e in entries)


def refuse_as_container(doc: dict[str, Any], what: str) -> None:
    """:raises FailedPrecondition: `doc` is an OS image, which no container can run."""
    if is_os_manifest(doc) or is_os_index(doc):
        raise FailedPrecondition(f"{what} is an IronCore OS image: machines boot it (IRI), "
                                 "it cannot be pulled or run as a container image")


def parse_os_manifest(doc: dict[str, Any], what: str) -> OsManifest:
    """The config and role -> layer of an OS image manifest.

    :raises InvalidArgument: not an OS image, an unknown or repeated layer type, or nothing
        to boot (neither a disk nor a kernel).
    """
    if not is_os_manifest(doc):
        config = doc.get("config")
        media = config.get("mediaType") if isinstance(config, dict) else None
        raise InvalidArgument(f"{what}: not an IronCore OS image (config media type {media!r}, "
                              f"no {CONFIG} and no osboot layers)")
    config = mf.Descriptor.parse(doc.get("config"), f"{what} config")
    if config.media_type != CONFIG:
        raise InvalidArgument(f"{what}: config has media type {config.media_type!r}, "
                              f"an OS image's is {CONFIG}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument(f"{what}: manifest has no layers list")
    layers: dict[str, mf.Descriptor] = {}
    for raw in raw_layers:
        layer = mf.Descriptor.parse(raw, f"{what} layer")
        role = LAYER_ROLES.get(layer.media_type)
        if role is None or layer.urls:
            raise InvalidArgument(f"{what}: layer {layer.digest} has unsupported media type "
                                  f"{layer.media_type!r} (an OS image's: "
                                  f"{', '.join(LAYER_ROLES)})")
        if role in layers:
            raise InvalidArgument(f"{what}: more than one {layer.media_type} layer")
        layers[role] = layer
    if "disk" not in layers and "kernel" not in layers:
        raise InvalidArgument(f"{what}: nothing to boot (neither a disk.img nor a kernel layer)")
    if "kernel" not in layers and ("initramfs" in layers or "squashfs" in layers):
        log.info("os image without kernel: its initramfs/squashfs are unused what=%s", what)
    return OsManifest(config, layers)


def select_os_platform(index: dict[str, Any], platform: mf.Platform, what: str) -> mf.Descriptor:
    """The OS index entry for this node: its architecture, the "virtualization" variant before
    an unnamed one, never "metal" (that one boots bare hardware over the network).

    :raises FailedPrecondition: no entry fits (the message lists what is offered).
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise InvalidArgument(f"{what}: index has no manifests list")
    best: tuple[int, mf.Descriptor] | None = None
    offered = []
    for entry in entries:
        desc = mf.Descriptor.parse(entry, what)
        annotations = entry.get("annotations") if isinstance(entry, dict) else None
        notes = annotations if isinstance(annotations, dict) else {}
        arch = str(desc.platform.get("architecture") or notes.get("architecture") or "")
        variant = str(notes.get("variant") or "")
        offered.append("/".join(x for x in (arch, variant) if x) or "?")
        if desc.media_type not in MANIFEST_TYPES or arch != platform.architecture:
            continue
        os_name = desc.platform.get("os")
        if os_name and os_name != platform.os:
            continue
        rank = {"virtualization": 0, "": 1}.get(variant)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, desc)
    if best is None:
        raise FailedPrecondition(f"{what}: no OS image for {platform.architecture} virtual "
                                 f"machines (offered: {', '.join(offered) or 'none'})")
    return best[1]


async def fetch(puller: Puller, ref: Reference, creds: Credentials | None,
                max_layer_bytes: int, progress: Progress | None = None) -> ResolvedOs:
    """Resolve `ref` to an OS image manifest and make its config and layers present in the
    content store, each verified against its descriptor.

    :raises InvalidArgument: not an OS image, or hostile (sizes beyond the limits).
    :raises FailedPrecondition: an index lying about sizes; no entry for this node.
    :raises NotFound, Unavailable, Internal: as container pulls.
    """
    client = puller.client
    docs, doc, media, index_digest = await puller.resolve(
        ref, creds, lambda index: select_os_platform(index, puller.platform, f"image {ref}"))
    digest = docs[-1][0]
    if media in mf.INDEX_TYPES:
        raise InvalidArgument(f"image {ref}: indexes nested deeper than {mf.MAX_INDEX_DEPTH}")
    manifest = parse_os_manifest(doc, f"image {ref}")
    if manifest.config.size > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"image {ref}: osboot config of {manifest.config.size} bytes is "
                              f"larger than {MAX_CONFIG_BYTES}")
    for layer in manifest.layers.values():
        if layer.size > max_layer_bytes:
            raise InvalidArgument(f"image {ref}: layer {layer.digest} of {layer.size} bytes is "
                                  f"larger than the limit of {max_layer_bytes} (max_layer_bytes)")
    layers = tuple(manifest.layers.values())
    held = {d for d, _ in docs} | {manifest.config.digest} | {d.digest for d in layers}
    with puller.lease(held):
        if puller.content.has(manifest.config.digest, manifest.config.size):
            config_bytes = await puller.content.read(manifest.config.digest)
        else:
            config_bytes = await client.fetch_small_blob(ref, manifest.config, creds)
        config = _parse_config(config_bytes, f"image {ref} config")
        await puller.fetch_blobs(ref, layers, creds, progress)
        # Small documents last: a manifest in the store means its layers are there too.
        await puller.content.put(manifest.config.digest, config_bytes)
        for doc_digest, doc_body in reversed(docs):
            await puller.content.put(doc_digest, doc_body)
    size = sum(len(b) for _, b in docs) + len(config_bytes) + sum(x.size for x in layers)
    return ResolvedOs(index_digest, digest, manifest, config, config_bytes, size)


def _parse_config(data: bytes, what: str) -> dict[str, Any]:
    if not data.strip():
        return {}  # an empty config blob: no command line
    config = mf.parse_json(data, what)
    line = config.get("commandLine", "")
    if not isinstance(line, str):
        raise InvalidArgument(f"{what}: commandLine is not a string")
    return config


# -- records -----------------------------------------------------------------------------------


def is_os_record(record: ImageRecord) -> bool:
    return record.extra.get("kind") == KIND


def record_of(resolved: ResolvedOs, tags: list[str], digests: list[str], created_ns: int,
              users: list[str]) -> ImageRecord:
    """The image record of an OS image: id is the manifest digest, the config blob is kept
    through extra["config_digest"], the machines using it in extra["users"]."""
    manifest = resolved.manifest
    return ImageRecord(
        id=resolved.manifest_digest, repo_tags=tags, repo_digests=digests,
        size=resolved.content_size, manifest_digest=resolved.manifest_digest,
        index_digest=resolved.index_digest,
        layers=[LayerRecord(d.digest, d.size, d.media_type, d.digest)
                for d in manifest.layers.values()],
        config=resolved.config, created_ns=created_ns,
        extra={"kind": KIND, "config_digest": manifest.config.digest, "users": users},
    )


def os_image_of(record: ImageRecord, ref: Reference, blob_path: Callable[[str], Path]
                ) -> OsImage:
    """The OsImage view of a record; `blob_path(digest)` is the content store's path."""
    paths: dict[str, Path] = {}
    for layer in record.layers:
        role = LAYER_ROLES.get(layer.media_type)
        if role is not None:
            paths[role] = blob_path(layer.digest)
    digest = record.index_digest or record.manifest_digest
    return OsImage(
        id=record.id, ref=str(ref), image_ref=ref.with_digest(digest), digest=digest,
        kernel=paths.get("kernel"), initramfs=paths.get("initramfs"), disk=paths.get("disk"),
        squashfs=paths.get("squashfs"), config=dict(record.config), size=record.size,
    )
