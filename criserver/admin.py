"""criserver's own calls (criserver.admin.v1), served beside the CRI: pull with progress,
image-layout import and the IronCore OS images machines boot, used by `criserver image ...`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from criserver.api.admin.v1 import admin_pb2 as admin
from criserver.errors import InvalidArgument
from criserver.image.auth import Credentials
from criserver.image.service import ImageService

# At most this many progress messages wait for a slow client; older ones are dropped (the next
# one supersedes them anyway).
PROGRESS_BACKLOG = 256
# Every call of criserver.admin.v1.Images is implemented.
MISSING: dict[str, str] = {}


def images_service(images: ImageService) -> dict[str, Any]:
    return {"Pull": partial(pull, images), "Import": partial(import_, images),
            "ListOsImages": partial(list_os_images, images),
            "RemoveOsImage": partial(remove_os_image, images)}


async def pull(
    images: ImageService, request: admin.PullRequest
) -> AsyncIterator[admin.PullProgress]:
    if not request.image:
        raise InvalidArgument("image must not be empty")
    queue: asyncio.Queue[admin.PullProgress] = asyncio.Queue(PROGRESS_BACKLOG)

    def progress(digest: str, done: int, total: int) -> None:
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(admin.PullProgress(digest=digest, done=done, total=total))

    creds = (Credentials(username=request.username, password=request.password)
             if request.username else None)
    async def pull_image() -> str:
        if request.os_image:
            return (await images.pull_os_image(request.image, creds, progress)).id
        return await images.pull(request.image, creds, progress)

    task = asyncio.create_task(pull_image())
    try:
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        yield admin.PullProgress(image_id=task.result())
    finally:
        task.cancel()


async def import_(images: ImageService, request: admin.ImportRequest) -> admin.ImportResponse:
    path = Path(request.path)
    if not path.is_absolute():
        raise InvalidArgument(f"import path {request.path!r} must be absolute")
    ids = await images.import_layout(path, request.name or None)
    return admin.ImportResponse(image_ids=ids)


async def list_os_images(images: ImageService, request: admin.ListOsImagesRequest
                         ) -> admin.ListOsImagesResponse:
    return admin.ListOsImagesResponse(images=[
        admin.OsImage(id=r.id, repo_tags=r.repo_tags, repo_digests=r.repo_digests, size=r.size,
                      users=images.os_image_users(r.id))
        for r in images.os_images()])


async def remove_os_image(images: ImageService, request: admin.RemoveOsImageRequest
                          ) -> admin.RemoveOsImageResponse:
    if not request.image:
        raise InvalidArgument("image must not be empty")
    await images.remove_os_image(request.image)
    return admin.RemoveOsImageResponse()
