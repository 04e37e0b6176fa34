"""The image store: what criserver knows about each pulled image, kept in memory and written
through to the `images` table of the daemon's database as JSON, beside pods and containers.

It matches exact ids, tags and digest references only; turning what a CRI caller typed into
those (`busybox` = `docker.io/library/busybox:latest`) is the image service's job.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from criserver.store.db import Database

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    digest: str
    size: int
    media_type: str
    diff_id: str


@dataclass
class ImageRecord:
    id: str  # "sha256:<config digest hex>"
    repo_tags: list[str]
    repo_digests: list[str]
    size: int  # bytes of content: manifest(s) + config + compressed layers
    manifest_digest: str  # the platform manifest
    index_digest: str  # the manifest list / index the pull resolved, or ""
    layers: list[LayerRecord]
    config: dict[str, Any]  # ImageConfigInfo.as_dict()
    uid: int | None = None
    username: str = ""
    created_ns: int = 0
    # Removed by the user but still used by containers: hidden, content kept until unused.
    removed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def blobs(self) -> set[str]:
        digests = {self.id, self.manifest_digest, *(layer.digest for layer in self.layers)}
        if self.index_digest:
            digests.add(self.index_digest)
        # An OS image's id is its manifest digest: its config blob is named here.
        config_digest = self.extra.get("config_digest")
        if isinstance(config_digest, str) and config_digest:
            digests.add(config_digest)
        return digests

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageRecord:
        data = json.loads(text)
        data["layers"] = [LayerRecord(**layer) for layer in data.get("layers", [])]
        return cls(**data)


class ImageStore:
    """All image records, by id; tags and digest references are matched by scanning (a node
    holds tens of images, not thousands)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._by_id: dict[str, ImageRecord] = {}

    async def load(self) -> None:
        rows = await self.db.read(
            lambda conn: conn.execute("SELECT id, record FROM images").fetchall()
        )
        for image_id, text in rows:
            try:
                self._by_id[image_id] = ImageRecord.from_json(text)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("unreadable image record skipped image_id=%s error=%s", image_id, exc)
        log.info("image records loaded count=%d", len(self._by_id))

    def all(self, include_removed: bool = False) -> list[ImageRecord]:
        return [r for r in self._by_id.values() if include_removed or not r.removed]

    def by_id(self, image_id: str) -> ImageRecord | None:
        return self._by_id.get(image_id)

    def visible(self, image_id: str) -> ImageRecord | None:
        """The image with this exact id, unless it was removed."""
        record = self._by_id.get(image_id)
        return record if record is not None and not record.removed else None

    def tagged(self, tag: str) -> ImageRecord | None:
        """The visible image carrying this normalised tag (a tag names one image at most)."""
        return next((r for r in self.all() if tag in r.repo_tags), None)

    def with_digest(self, repo_digest: str) -> ImageRecord | None:
        """The visible image pulled as this normalised `name@digest`."""
        return next((r for r in self.all() if repo_digest in r.repo_digests), None)

    async def save(self, record: ImageRecord) -> list[ImageRecord]:
        """Store `record`; its tags move away from other images (returned, also saved)."""
        changed = [record]
        for other in self._by_id.values():
            if other.id != record.id and set(other.repo_tags) & set(record.repo_tags):
                tags = [t for t in other.repo_tags if t not in record.repo_tags]
                changed.append(replace(other, repo_tags=tags))
        rows = [(r.id, r.to_json()) for r in changed]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO images(id, record) VALUES (?, ?)", rows)

        await self.db.write(write)
        for r in changed:
            self._by_id[r.id] = r
        return changed[1:]

    async def delete(self, image_id: str) -> None:
        await self.db.write(
            lambda conn: conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
        )
        self._by_id.pop(image_id, None)
