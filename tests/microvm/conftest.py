"""Fixtures the micro-VM backend's tests share."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver.backends.microvm.shares import PodVolumes, prepare_volumes_root


@pytest.fixture
def volumes(tmp_path: Path) -> Iterator[PodVolumes]:
    """A pod's volumes directory under a fresh volumes root (a private bind mount of its own);
    everything unmounted afterwards."""
    root = tmp_path / "volumes"
    prepare_volumes_root(root)
    pod = PodVolumes(root / "pod")
    pod.create()
    yield pod
    asyncio.run(pod.remove_all())
    subprocess.run(["umount", "-l", str(root)], check=False)
