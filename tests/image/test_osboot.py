"""IronCore OS images through the image service, against the in-test registry (which serves any
manifest type, lies included): recognition by media types, index and plain manifest forms,
refusals, no second download, shared concurrent pulls, hiding from CRI, in-use protection."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.image import ImageService, osboot
from criserver.image import manifest as mf
from criserver.image.content import BlobMismatch
from tests.image.conftest import ServiceFactory
from tests.image.fakeregistry import FakeRegistry
from tests.image.oci import OCI_INDEX, OCI_MANIFEST, sha
from tests.image.test_registry_faults import two_layer_image
from tests.machine.os_image import index_bytes, manifest_bytes

CONFIG = json.dumps({"commandLine": "console=ttyS0 quiet"}).encode()


def os_layers(size: int = 50_000) -> list[tuple[str, bytes]]:
    return [(osboot.KERNEL, os.urandom(size)), (osboot.INITRAMFS, os.urandom(size)),
            (osboot.DISK, os.urandom(size))]


def add_os(fake: FakeRegistry, repo: str, tag: str, layers: list[tuple[str, bytes]],
           config: bytes = CONFIG, as_index: bool = False,
           manifest: bytes | None = None) -> str:
    """Serve an OS image; returns the digest the tag names."""
    body = manifest or manifest_bytes(config, layers)
    fake.blobs.update({sha(blob): blob for _, blob in layers})
    fake.blobs[sha(config)] = config
    fake.manifests[f"{repo}/{sha(body)}"] = (body, OCI_MANIFEST)
    if not as_index:
        fake.manifests[f"{repo}/{tag}"] = (body, OCI_MANIFEST)
        return sha(body)
    index = index_bytes(body)
    fake.manifests[f"{repo}/{tag}"] = (index, OCI_INDEX)
    fake.manifests[f"{repo}/{sha(index)}"] = (index, OCI_INDEX)
    return sha(index)


# -- recognition, without a registry -----------------------------------------------------------


def manifest_doc(config_type: str, layer_types: list[str]) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": sha(b"c"), "size": 1},
            "layers": [{"mediaType": t, "digest": sha(t.encode()), "size": 1}
                       for t in layer_types]}


def test_recognised_by_config_or_layer_media_types() -> None:
    assert osboot.is_os_manifest(manifest_doc(osboot.CONFIG, [osboot.DISK]))
    assert osboot.is_os_manifest(manifest_doc("application/vnd.oci.image.config.v1+json",
                                              [osboot.KERNEL]))
    assert not osboot.is_os_manifest(manifest_doc(
        "application/vnd.oci.image.config.v1+json", ["application/vnd.oci.image.layer.v1.tar"]))
    parsed = osboot.parse_os_manifest(
        manifest_doc(osboot.CONFIG, [osboot.KERNEL, osboot.INITRAMFS, osboot.SQUASHFS]), "t")
    assert sorted(parsed.layers) == ["initramfs", "kernel", "squashfs"]


@pytest.mark.parametrize(("config_type", "layer_types", "message"), [
    (osboot.CONFIG, [osboot.DISK, "application/x-unknown"], "unsupported media type"),
    (osboot.CONFIG, [osboot.KERNEL, osboot.KERNEL], "more than one"),
    (osboot.CONFIG, [osboot.INITRAMFS], "nothing to boot"),
    (osboot.CONFIG, [], "nothing to boot"),
    ("application/vnd.oci.image.config.v1+json", [osboot.DISK], "config has media type"),
    ("application/vnd.oci.image.config.v1+json", ["application/vnd.oci.image.layer.v1.tar"],
     "not an IronCore OS image"),
])
def test_refused_manifests(config_type: str, layer_types: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        osboot.parse_os_manifest(manifest_doc(config_type, layer_types), "t")


def test_platform_choice_prefers_virtualization_and_never_metal() -> None:
    def entry(arch: str, variant: str, name: bytes) -> dict[str, Any]:
        return {"mediaType": osboot.ARTIFACTS_MANIFEST, "digest": sha(name), "size": 1,
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {"variant": variant} if variant else {}}

    index = {"manifests": [entry("amd64", "metal", b"m"), entry("arm64", "virtualization", b"a"),
                           entry("amd64", "", b"plain"), entry("amd64", "virtualization", b"v")]}
    assert osboot.select_os_platform(index, mf.Platform(), "t").digest == sha(b"v")
    index["manifests"] = index["manifests"][:2]
    with pytest.raises(FailedPrecondition, match="offered: amd64/metal, arm64/virtualization"):
        osboot.select_os_platform(index, mf.Platform(), "t")


# -- pulls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_index", [False, True], ids=["manifest", "index"])
async def test_pull_os_image(service: ImageService, fake: FakeRegistry, as_index: bool) -> None:
    layers = os_layers()
    digest = add_os(fake, "os/test", "v1", layers, as_index=as_index)
    image = await service.pull_os_image(f"{fake.host}/os/test:v1")
    assert image.image_ref == f"{fake.host}/os/test@{digest}"
    assert image.ref == f"{fake.host}/os/test:v1"
    assert image.command_line == "console=ttyS0 quiet"
    assert image.kernel is not None and image.kernel.read_bytes() == layers[0][1]
    assert image.initramfs is not None and image.initramfs.read_bytes() == layers[1][1]
    assert image.disk is not None and image.disk.read_bytes() == layers[2][1]
    assert image.squashfs is None
    # Not a container image: CRI lists and lookups never see it (nor kubelet's image GC).
    assert service.images() == []
    assert service.get(f"{fake.host}/os/test:v1") is None
    assert service.get(image.id) is None
    assert [r.id for r in service.os_images()] == [image.id]
    assert service.get_os_image(f"{fake.host}/os/test:v1") == image


async def test_second_pull_downloads_nothing_and_concurrent_pulls_share_one(
        service: ImageService, fake: FakeRegistry) -> None:
    layers = os_layers(300_000)
    digest = add_os(fake, "os/test", "v1", layers)
    ref = f"{fake.host}/os/test:v1"
    first = await asyncio.gather(*(service.pull_os_image(ref) for _ in range(4)))
    assert all(image == first[0] for image in first)
    assert all(fake.blob_gets[sha(blob)] == 1 for _, blob in layers)
    again = await service.pull_os_image(ref)
    assert again == first[0]
    assert all(fake.blob_gets[sha(blob)] == 1 for _, blob in layers)
    # A blob lost from the store is fetched again, even by digest.
    by_digest_ref = f"{fake.host}/os/test@{digest}"
    assert first[0].kernel is not None
    first[0].kernel.unlink()
    await service.content.start()  # rescans the store
    fixed = await service.pull_os_image(by_digest_ref)
    assert fixed.kernel is not None and fixed.kernel.read_bytes() == layers[0][1]
    assert fake.blob_gets[sha(layers[0][1])] == 2
    # By digest, once pulled, no registry is needed at all.
    await fake.stop()
    by_digest = await service.pull_os_image(by_digest_ref)
    assert by_digest.id == first[0].id and by_digest.kernel == first[0].kernel


async def test_pulled_state_survives_a_restart(make_service: ServiceFactory,
                                               fake: FakeRegistry) -> None:
    add_os(fake, "os/test", "v1", os_layers())
    first: ImageService = await make_service()
    image = await first.pull_os_image(f"{fake.host}/os/test:v1")
    await first.use_os_image(image.id, "machine-1")
    second: ImageService = await make_service()
    assert second.get_os_image(f"{fake.host}/os/test:v1") == image
    by_id = second.get_os_image(image.id)
    # By id it is named by the digest it was pulled as.
    assert by_id is not None and by_id.ref == image.image_ref and by_id.kernel == image.kernel
    assert second.os_image_users(image.id) == ["machine-1"]


async def test_container_and_os_pulls_refuse_each_other(service: ImageService,
                                                        fake: FakeRegistry) -> None:
    add_os(fake, "os/test", "v1", os_layers())
    add_os(fake, "os/test", "idx", os_layers(), as_index=True)
    fake.add("app/web", "v1", two_layer_image(1000))
    for tag in ("v1", "idx"):
        with pytest.raises(FailedPrecondition, match="is an IronCore OS image"):
            await service.pull(f"{fake.host}/os/test:{tag}")
    with pytest.raises(InvalidArgument, match="not an IronCore OS image"):
        await service.pull_os_image(f"{fake.host}/app/web:v1")


async def test_hostile_images_are_refused(service: ImageService, fake: FakeRegistry) -> None:
    # An index lying about its manifest's size.
    layers = os_layers()
    body = manifest_bytes(CONFIG, layers)
    add_os(fake, "os/lie", "v1", layers, as_index=True)
    index = json.loads(fake.manifests["os/lie/v1"][0])
    index["manifests"][0]["size"] = len(body) + 10
    fake.manifests["os/lie/v1"] = (json.dumps(index).encode(), OCI_INDEX)
    with pytest.raises(FailedPrecondition, match="index says"):
        await service.pull_os_image(f"{fake.host}/os/lie:v1")
    # A huge config.
    huge = b'{"commandLine": "' + b"x" * osboot.MAX_CONFIG_BYTES + b'"}'
    add_os(fake, "os/huge", "v1", os_layers(), config=huge)
    with pytest.raises(InvalidArgument, match="osboot config of"):
        await service.pull_os_image(f"{fake.host}/os/huge:v1")
    # A layer whose bytes are not the ones its descriptor names.
    layers = os_layers()
    add_os(fake, "os/bad", "v1", layers)
    fake.blobs[sha(layers[2][1])] = os.urandom(len(layers[2][1]))
    with pytest.raises(BlobMismatch):
        await service.pull_os_image(f"{fake.host}/os/bad:v1")
    # A layer larger than the node allows.
    doc = json.loads(manifest_bytes(CONFIG, os_layers()))
    doc["layers"][2]["size"] = service.config.max_layer_bytes + 1
    add_os(fake, "os/big", "v1", os_layers(), manifest=json.dumps(doc).encode())
    with pytest.raises(InvalidArgument, match="max_layer_bytes"):
        await service.pull_os_image(f"{fake.host}/os/big:v1")
    # Nothing of these stays behind.
    assert service.os_images() == []
    await service.gc()
    assert service.content.digests() == set()


async def test_in_use_os_image_is_not_removed(service: ImageService, fake: FakeRegistry) -> None:
    add_os(fake, "os/test", "v1", os_layers())
    image = await service.pull_os_image(f"{fake.host}/os/test:v1", user="machine-1")
    assert service.os_image_users(image.id) == ["machine-1"]
    await service.use_os_image(image.id, "machine-1")  # idempotent
    await service.use_os_image(image.id, "machine-2")
    with pytest.raises(FailedPrecondition, match="in use by machines machine-1, machine-2"):
        await service.remove_os_image(image.ref)
    # A CRI RemoveImage does not see it; image GC keeps its blobs.
    await service.remove(image.ref)
    await service.gc()
    assert image.kernel is not None and image.kernel.exists()
    await service.release_os_image(image.id, "machine-1")
    await service.release_os_image(image.id, "machine-2")
    await service.release_os_image(image.id, "machine-2")  # idempotent
    await service.remove_os_image(image.ref)
    assert service.get_os_image(image.ref) is None
    assert not image.kernel.exists()
    assert service.content.digests() == set()
