"""The CRI ImageService table: each call a function that translates the CRI request to an
`ImageService` call and its records to CRI messages. No domain logic and no error handling here
(the instrumentation layer maps the domain errors to gRPC status codes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as _api_pb2
from criserver.errors import InvalidArgument
from criserver.image.service import FsUsage, ImageService
from criserver.store.images import ImageRecord

# Generated protobuf code has no type information.
api_pb2: Any = _api_pb2

# Why each unimplemented call is: the caller sees this in the UNIMPLEMENTED status.
MISSING = {"StreamImages": "use ListImages: streamed image lists are not built yet"}


def image_service(images: ImageService, container_fs: Path | None = None) -> dict[str, Any]:
    """`container_fs` is the container filesystem ImageFsInfo reports."""
    return {
        "ListImages": partial(list_images, images),
        "ImageStatus": partial(image_status, images),
        "PullImage": partial(pull_image, images),
        "RemoveImage": partial(remove_image, images),
        "ImageFsInfo": partial(image_fs_info, images, container_fs),
    }


async def list_images(images: ImageService, request: Any) -> Any:
    text = request.filter.image.image if request.HasField("filter") else ""
    return api_pb2.ListImagesResponse(images=[_image(images, r) for r in images.images(text)])


async def image_status(images: ImageService, request: Any) -> Any:
    record = images.get(_image_text(request.image))
    if record is None:
        return api_pb2.ImageStatusResponse()
    info = {}
    if request.verbose:
        info["info"] = json.dumps(
            {**asdict(record), "snapshot": str(images.snapshot_path(record.id))}
        )
    return api_pb2.ImageStatusResponse(image=_image(images, record), info=info)


async def pull_image(images: ImageService, request: Any) -> Any:
    text = _image_text(request.image)
    auth = request.auth if request.HasField("auth") else None
    # The caller's deadline is applied to every call by the instrumentation layer.
    image_id = await images.pull(text, auth)
    return api_pb2.PullImageResponse(image_ref=image_id)


async def remove_image(images: ImageService, request: Any) -> Any:
    await images.remove(_image_text(request.image))
    return api_pb2.RemoveImageResponse()


async def image_fs_info(images: ImageService, container_fs: Path | None, request: Any) -> Any:
    image_fs = [_usage(await images.fs_usage())]
    container_filesystems = []
    if container_fs is not None:
        container_filesystems.append(_usage(await images.fs_usage(container_fs)))
    return api_pb2.ImageFsInfoResponse(image_filesystems=image_fs,
                                       container_filesystems=container_filesystems)


def _image(images: ImageService, record: ImageRecord) -> Any:
    image = api_pb2.Image(
        id=record.id, repo_tags=record.repo_tags, repo_digests=record.repo_digests,
        size=record.size, username=record.username,
        spec=api_pb2.ImageSpec(image=record.id),
        pinned=images.is_pinned(record),
    )
    if record.uid is not None:
        image.uid.value = record.uid
    return image


def _image_text(spec: Any) -> str:
    text = spec.image.strip()
    if not text:
        raise InvalidArgument("image spec names no image")
    return str(text)


def _usage(usage: FsUsage) -> Any:
    return api_pb2.FilesystemUsage(
        timestamp=time.time_ns(),
        fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(usage.path)),
        used_bytes=api_pb2.UInt64Value(value=usage.used_bytes),
        inodes_used=api_pb2.UInt64Value(value=usage.inodes_used),
    )
