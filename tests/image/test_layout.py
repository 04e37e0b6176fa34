"""`import_layout`: OCI image layouts written by skopeo (a real tool), as a directory and as a
tar archive, for air-gapped nodes."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from criserver.errors import NotFound
from criserver.image import ImageService
from tests.image.conftest import Pushed, snapshot_root

pytestmark = pytest.mark.registry


def skopeo_layout(pushed: Pushed, repo_tag: str, dest: Path) -> Path:
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{pushed.ref(repo_tag)}", f"oci:{dest}:v1"],
                   check=True, capture_output=True)
    return dest


async def test_import_directory(service: ImageService, pushed: Pushed, tmp_path: Path) -> None:
    layout = skopeo_layout(pushed, "test/busybox:v1", tmp_path / "layout")
    ids = await service.import_layout(layout, name="example.com/imported/busybox:v1")
    assert ids == [pushed.busybox.id]
    record = service.get("example.com/imported/busybox:v1")
    assert record is not None and record.id == pushed.busybox.id
    with snapshot_root(service.snapshot_path(record.id), tmp_path / "mnt") as (root, _):
        assert (root / "usr/share/hello").read_text() == "hello from layer 3\n"
        assert not (root / "tmp/gone").exists()


async def test_import_tar_with_full_name_annotation(service: ImageService, pushed: Pushed,
                                                    tmp_path: Path) -> None:
    layout = skopeo_layout(pushed, "test/multi", tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"]["io.containerd.image.name"] = "docker.io/x/multi:2"
    (layout / "index.json").write_text(json.dumps(index))
    archive = tmp_path / "multi.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    ids = await service.import_layout(archive)
    assert ids == [pushed.multi[0].id]
    record = service.get("x/multi:2")
    assert record is not None
    assert record.repo_tags == ["docker.io/x/multi:2"]


async def test_import_rejects_non_layouts(service: ImageService, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await service.import_layout(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound):
        await service.import_layout(tmp_path / "empty")
