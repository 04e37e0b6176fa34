"""The ImageService through the daemon's CRI socket and the `criserver image` CLI, against a
real docker-registry process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest

from criserver.image import osboot
from tests.cri_client import REPO, CRIClient, msg
from tests.daemon import Daemon
from tests.image.oci import OCI_MANIFEST, Pusher
from tests.machine.os_image import manifest_bytes
from tests.registry import Pushed, Registry


def spec(image: str) -> object:
    return msg("ImageSpec", image=image)


async def _fs_used(cri: CRIClient) -> int:
    info = await cri.image.ImageFsInfo(msg("ImageFsInfoRequest"))
    return int(info.image_filesystems[0].used_bytes.value)


async def test_pull_status_list_remove(cri: CRIClient, pushed: Pushed) -> None:
    tag = pushed.ref("test/busybox:v1")
    before = await _fs_used(cri)
    missing = await cri.image.ImageStatus(msg("ImageStatusRequest", image=spec(tag)))
    assert not missing.HasField("image")

    pulled = await cri.image.PullImage(msg("PullImageRequest", image=spec(tag)))
    image_id = pulled.image_ref
    assert image_id == pushed.busybox.id
    by_digest = pushed.ref(f"test/busybox@{pushed.busybox_digest}")
    for name in (tag, image_id, by_digest):
        status = await cri.image.ImageStatus(msg("ImageStatusRequest", image=spec(name),
                                                 verbose=True))
        assert status.image.id == image_id, name
        assert tag in status.image.repo_tags
        assert by_digest in status.image.repo_digests
        assert status.image.size > 0
        assert "snapshot" in status.info["info"]
    listed = await cri.image.ListImages(msg("ListImagesRequest"))
    assert [i.id for i in listed.images] == [image_id]
    filtered = await cri.image.ListImages(msg("ListImagesRequest", filter=msg(
        "ImageFilter", image=spec("nosuch:tag"))))
    assert not filtered.images
    assert await _fs_used(cri) > before

    await cri.image.RemoveImage(msg("RemoveImageRequest", image=spec(tag)))
    await cri.image.RemoveImage(msg("RemoveImageRequest", image=spec(tag)))  # idempotent
    assert not (await cri.image.ListImages(msg("ListImagesRequest"))).images
    assert await _fs_used(cri) < before + 4096 * 64


async def test_pull_unknown_image_fails_clearly(cri: CRIClient, pushed: Pushed) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.image.PullImage(msg("PullImageRequest",
                                      image=spec(pushed.ref("test/nosuch:v1"))))
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    assert "nosuch" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.image.PullImage(msg("PullImageRequest", image=spec("UPPER/Case::bad")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _cli(daemon: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "criserver", "image", "--endpoint", f"unix://{daemon.socket}",
         *args], capture_output=True, text=True, cwd=REPO, input=stdin,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120,
    )


def test_cli_pull_ls_rm_import(daemon: Daemon, pushed: Pushed, tmp_path: Path) -> None:
    tag = pushed.ref("test/busybox:v1")
    pulled = _cli(daemon, "pull", tag)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == pushed.busybox.id
    assert "done" in pulled.stderr  # per-blob progress lines when not on a terminal
    listed = _cli(daemon, "ls")
    assert tag in listed.stdout and pushed.busybox.id.split(":")[1][:12] in listed.stdout
    removed = _cli(daemon, "rm", tag)
    assert removed.returncode == 0, removed.stderr
    assert tag not in _cli(daemon, "ls").stdout

    # An OCI layout made by skopeo from the registry, imported without the registry.
    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{tag}",
                    f"oci:{layout}:imported"], check=True, capture_output=True, timeout=120)
    imported = _cli(daemon, "import", str(layout), "--name", "example.com/imported:v1")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == pushed.busybox.id
    assert "example.com/imported:v1" in _cli(daemon, "ls").stdout

    missing = _cli(daemon, "import", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1
    assert "nothing-here" in missing.stderr


async def test_os_images_through_the_daemon(daemon: Daemon, cri: CRIClient,
                                            registry: Registry) -> None:
    """An IronCore OS image: `image pull --os` fetches it, the CRI never lists it (kubelet's
    image GC cannot remove what machines boot), `image ls --os` and `image rm --os` manage it."""
    config = b'{"commandLine": "console=ttyS0"}'
    layers = [(osboot.KERNEL, os.urandom(4096)), (osboot.DISK, os.urandom(8192))]
    body = manifest_bytes(config, layers)
    async with aiohttp.ClientSession() as session:
        pusher = Pusher(session, registry.base)
        for blob in (config, *(b for _, b in layers)):
            await pusher.blob("iri/cli-os", blob)
        digest = await pusher.manifest("iri/cli-os", "v1", body, OCI_MANIFEST)
    ref = f"{registry.host}/iri/cli-os:v1"

    as_container = await asyncio.to_thread(_cli, daemon, "pull", ref)
    assert as_container.returncode == 1 and "is an IronCore OS image" in as_container.stderr
    pulled = await asyncio.to_thread(_cli, daemon, "pull", "--os", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == digest
    assert not (await cri.image.ListImages(msg("ListImagesRequest"))).images
    assert ref not in (await asyncio.to_thread(_cli, daemon, "ls")).stdout
    listed = await asyncio.to_thread(_cli, daemon, "ls", "--os")
    assert ref in listed.stdout and digest.split(":")[1][:12] in listed.stdout
    # A CRI RemoveImage does not reach it.
    await cri.image.RemoveImage(msg("RemoveImageRequest", image=spec(ref)))
    assert ref in (await asyncio.to_thread(_cli, daemon, "ls", "--os")).stdout
    removed = await asyncio.to_thread(_cli, daemon, "rm", "--os", ref)
    assert removed.returncode == 0, removed.stderr
    assert ref not in (await asyncio.to_thread(_cli, daemon, "ls", "--os")).stdout
