from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.cri_client import CRIClient
from tests.daemon import Daemon
from tests.registry import (  # noqa: F401 - shared fixtures
    auth_registry,
    busybox_ref,
    pushed,
    registry,
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh daemon (inert test backend) per test, killed at the end."""
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
async def cri(daemon: Daemon) -> AsyncIterator[CRIClient]:
    client = daemon.client()
    try:
        yield client
    finally:
        await client.close()
