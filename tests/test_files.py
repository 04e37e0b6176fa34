"""Whole-file replacement of small state files (criserver.files)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from criserver import files


def test_write_atomic_replaces_the_content_with_the_mode_asked_whatever_the_umask(
        tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    files.write_atomic(path, "old")
    old_umask = os.umask(0o077)
    try:
        files.write_atomic(path, b"new", mode=0o644)
        files.write_atomic(tmp_path / "secret", b"key", mode=0o600)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["secret", "state.json", "sub"]


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "inside").write_text("kept")
    with pytest.raises(IsADirectoryError):
        files.write_atomic(target, "x")
    assert (target / "inside").read_text() == "kept"
    assert not files.temp_name(target).exists()


def test_remove_takes_the_file_and_a_left_temp_and_may_repeat(tmp_path: Path) -> None:
    path = tmp_path / "pod.json"
    path.write_text("{}")
    files.temp_name(path).write_text("{")  # what a crash between write and rename leaves
    files.remove(path)
    assert list(tmp_path.iterdir()) == []
    files.remove(path)
