"""Images: pulling from registries, the content store, snapshots and the CRI ImageService;
the IronCore OS images IRI machines boot (OsImage)."""

from criserver.image.osboot import OsImage
from criserver.image.service import FsUsage, ImageService

__all__ = ["FsUsage", "ImageService", "OsImage"]
