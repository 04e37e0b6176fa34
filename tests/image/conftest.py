"""Fixtures for the image tests: an ImageService on a temp root with its own database (the
registries and pushed images come from tests/registry.py through tests/conftest.py)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from criserver.config import ImageConfig
from criserver.image import ImageService
from criserver.store.db import Database
from tests.image.fakeregistry import FakeRegistry
from tests.registry import (  # noqa: F401 - helpers the image tests import from here
    BUSYBOX,
    PASSWORD,
    T0,
    USER,
    Pushed,
    Registry,
    busybox_image,
    free_port,
    small_image,
)

# -- the service under test --------------------------------------------------------------------

ServiceFactory = Callable[..., Any]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Builds started ImageServices on tmp_path (same root and database for each call, so a
    second one sees the first one's state, as after a restart); closes them all at the end."""
    opened: list[tuple[ImageService, Database]] = []

    async def make(**kw: Any) -> ImageService:
        config = kw.pop("config", None) or ImageConfig()
        db = await Database.open(tmp_path / "db.sqlite")
        service = ImageService(config, tmp_path / "root", db, **kw)
        await service.start()
        opened.append((service, db))
        return service

    try:
        yield make
    finally:
        for service, db in opened:
            await service.close()
            await db.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    """The in-test registry (tests/image/fakeregistry.py), stopped at the end."""
    reg = await FakeRegistry().start()
    try:
        yield reg
    finally:
        await reg.stop()


@pytest.fixture
async def service(make_service: ServiceFactory) -> ImageService:
    svc: ImageService = await make_service()
    return svc


@contextmanager
def snapshot_root(snapshot: Path, workdir: Path) -> Iterator[tuple[Path, bool]]:
    """The snapshot's tree: loop-mounted read-only (exact: set-uid bits, hardlinks), or when
    this host cannot loop-mount, extracted with fsck.erofs (which drops set-uid bits).
    Yields (root, mounted)."""
    target = workdir / "rootfs"
    target.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(snapshot),
                              str(target)], capture_output=True).returncode == 0
    if not mounted:
        subprocess.run(["fsck.erofs", f"--extract={target}", "--overwrite", "--preserve",
                        str(snapshot)], check=True, capture_output=True)
    try:
        yield target, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=True)


def erofs_inode(snapshot: Path, path: str) -> tuple[int, int]:
    """(nid, link count) of `path` inside an EROFS image (fsck's extraction splits hardlinks)."""
    out = subprocess.run(["dump.erofs", f"--path={path}", str(snapshot)],
                         check=True, capture_output=True, text=True).stdout
    fields = out.split()
    return int(fields[fields.index("NID:") + 1]), int(fields[fields.index("Links:") + 1])
