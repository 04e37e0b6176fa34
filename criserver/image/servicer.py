"""The CRI ImageService servicer: translates CRI requests to `ImageService` calls and records
to CRI messages. No domain logic and no error handling here (the instrumentation layer maps
the domain errors to gRPC status codes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as _api_pb2
from criserver.errors import InvalidArgument
from criserver.image.service import FsUsage, ImageService
from criserver.store.images import ImageRecord

# Generated protobuf code has no type information.
api_pb2: Any = _api_pb2


class ImageServicer:
    """CRI v1 ImageService. `container_fs` is the container filesystem ImageFsInfo reports."""

    def __init__(self, service: ImageService, container_fs: Path | None = None) -> None:
        self.service = service
        self.container_fs = container_fs

    async def ListImages(self, request: Any) -> Any:
        text = request.filter.image.image if request.HasField("filter") else ""
        images = [self._image(r) for r in self.service.images(text)]
        return api_pb2.ListImagesResponse(images=images)

    async def ImageStatus(self, request: Any) -> Any:
        record = self.service.get(_image_text(request.image))
        if record is None:
            return api_pb2.ImageStatusResponse()
        info = {}
        if request.verbose:
            info["info"] = json.dumps(
                {**asdict(record), "snapshot": str(self.service.snapshot_path(record.id))}
            )
        return api_pb2.ImageStatusResponse(image=self._image(record), info=info)

    async def PullImage(self, request: Any) -> Any:
        text = _image_text(request.image)
        auth = request.auth if request.HasField("auth") else None
        # The caller's deadline is applied to every call by the instrumentation layer.
        image_id = await self.service.pull(text, auth)
        return api_pb2.PullImageResponse(image_ref=image_id)

    async def RemoveImage(self, request: Any) -> Any:
        await self.service.remove(_image_text(request.image))
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(self, request: Any) -> Any:
        image_fs = [_usage(await self.service.fs_usage())]
        container_fs = []
        if self.container_fs is not None:
            container_fs.append(_usage(await self.service.fs_usage(self.container_fs)))
        return api_pb2.ImageFsInfoResponse(image_filesystems=image_fs,
                                           container_filesystems=container_fs)

    def _image(self, record: ImageRecord) -> Any:
        image = api_pb2.Image(
            id=record.id, repo_tags=record.repo_tags, repo_digests=record.repo_digests,
            size=record.size, username=record.username,
            spec=api_pb2.ImageSpec(image=record.id),
            pinned=self.service.is_pinned(record),
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
