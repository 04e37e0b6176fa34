"""The image store: records in the daemon's database, beside pods and containers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from criserver.store.db import Database
from criserver.store.images import ImageRecord, ImageStore, LayerRecord

TAG = "docker.io/library/busybox:latest"
DIGEST = "docker.io/library/busybox@sha256:" + "d" * 64


def image(n: int, tags: list[str], digests: tuple[str, ...] = ()) -> ImageRecord:
    return ImageRecord(
        id=f"sha256:{n:064x}", repo_tags=tags, repo_digests=list(digests), size=10,
        manifest_digest="sha256:" + "m" * 64, index_digest="",
        layers=[LayerRecord("sha256:" + "l" * 64, 5, "application/x", "sha256:" + "f" * 64)],
        config={"user": "1000"}, created_ns=n)


async def opened(path: Path) -> tuple[Database, ImageStore]:
    db = await Database.open(path)
    store = ImageStore(db)
    await store.load()
    return db, store


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    await store.save(image(1, [TAG], (DIGEST,)))
    await db.close()
    db, store = await opened(tmp_path / "db")
    try:
        assert store.all() == [image(1, [TAG], (DIGEST,))]
        assert store.tagged(TAG) == store.with_digest(DIGEST) == image(1, [TAG], (DIGEST,))
    finally:
        await db.close()


async def test_a_tag_moves_to_the_image_saved_last(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        await store.save(image(1, [TAG, "x:1"]))
        moved = await store.save(image(2, [TAG]))
        assert moved == [image(1, ["x:1"])]
        assert store.tagged(TAG) == image(2, [TAG])
    finally:
        await db.close()


async def test_a_removed_image_is_found_by_id_only(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        record = image(1, [TAG])
        await store.save(replace(record, removed=True, repo_tags=[]))
        assert store.visible(record.id) is None and store.all() == []
        assert store.by_id(record.id) is not None
        assert store.all(include_removed=True)[0].removed
        await store.delete(record.id)
        assert store.by_id(record.id) is None
    finally:
        await db.close()


async def test_rows_written_before_the_move_load_as_they_are(tmp_path: Path) -> None:
    # As criserver/image/records.py wrote them, in the same table: nothing to migrate.
    row = {"id": "sha256:" + "a" * 64, "repo_tags": [TAG], "repo_digests": [], "size": 3,
           "manifest_digest": "sha256:" + "b" * 64, "index_digest": "", "layers": [],
           "config": {}, "uid": None, "username": "", "created_ns": 1, "removed": False,
           "extra": {}}
    db = await Database.open(tmp_path / "db")
    await db.write(lambda c: c.execute("INSERT INTO images VALUES (?, ?)",
                                       (row["id"], json.dumps(row, sort_keys=True))))
    await db.close()
    db, store = await opened(tmp_path / "db")
    try:
        loaded = store.tagged(TAG)
        assert loaded is not None and loaded.to_json() == json.dumps(row, sort_keys=True)
    finally:
        await db.close()
