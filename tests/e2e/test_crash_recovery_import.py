"""Crash at every step of an image import (`criserver image import`, issue 18): the daemon
SIGKILLs itself at a named point while it copies an OCI image layout into its store, is started
again, and then the image is not listed, no blob, temp blob or snapshot of it is left, the same
layout imports again, and once that image is removed the store is as it was. No VM is booted
(the inert test backend; the image service is the daemon's own)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from criserver.failpoints import ENV
from tests.cri_client import REPO, msg
from tests.daemon import Daemon
from tests.image.test_layout import skopeo_layout
from tests.registry import Pushed

pytestmark = pytest.mark.registry

IMPORT_STEPS = [
    "import.layer_partial",  # a temp blob written, not committed
    "import.layer_stored",  # a layer committed, no manifest
    "import.content_stored",  # every blob, no snapshot or record
    "image.snapshot_built",  # snapshot and blobs, no record (shared with pulls)
]
NAME = "example.com/crash/imported:v1"


def _import(daemon: Daemon, layout: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "criserver", "image", "--endpoint", f"unix://{daemon.socket}",
         "import", str(layout), "--name", NAME],
        capture_output=True, text=True, cwd=REPO, timeout=120)


def _store(daemon: Daemon) -> set[str]:
    """Every file and directory of the image store's blobs and snapshots."""
    image = daemon.root / "image"
    return {str(p.relative_to(image)) for top in ("blobs", "snapshots")
            for p in (image / top).rglob("*")} if image.exists() else set()


@pytest.mark.parametrize("step", IMPORT_STEPS)
async def test_a_crash_in_an_image_import_leaks_nothing(daemon: Daemon, pushed: Pushed,
                                                        tmp_path: Path, step: str) -> None:
    layout = skopeo_layout(pushed, "test/busybox:v1", tmp_path / "layout")
    before = _store(daemon)

    daemon.stop()
    daemon.start(env={ENV: step})
    died = _import(daemon, layout)
    assert died.returncode == 1 and "UNAVAILABLE" in died.stderr, died.stderr
    assert daemon.process is not None and daemon.process.wait(30) == -signal.SIGKILL
    assert f"failpoint {step} reached" in daemon.log()

    daemon.start()
    cri = daemon.client()
    try:
        listed = (await cri.image.ListImages()).images
        assert not [i for i in listed if NAME in i.repo_tags]
        assert _store(daemon) == before, "blobs or snapshots of an image never recorded"

        done = _import(daemon, layout)
        assert done.returncode == 0, done.stderr
        status = await cri.image.ImageStatus(msg("ImageStatusRequest",
                                                 image=msg("ImageSpec", image=NAME)))
        assert status.image.id == pushed.busybox.id
        assert not [n for n in _store(daemon) if ".tmp" in n]
        await cri.image.RemoveImage(msg("RemoveImageRequest",
                                        image=msg("ImageSpec", image=NAME)))
        assert _store(daemon) == before
    finally:
        await cri.close()
