"""Images: pulling from registries, the content store, snapshots and the CRI ImageService."""

from criserver.image.service import FsUsage, ImageService

__all__ = ["FsUsage", "ImageService"]
