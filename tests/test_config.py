"""The configuration as `criserver config default` prints it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from criserver import cli
from criserver.backends.microvm.backend import MicroVMOptions
from criserver.config import ConfigError, build_options, load


def _tables(text: str) -> dict[str, list[tuple[str, list[str]]]]:
    """Each [table]'s keys in order, with the comment lines just above each."""
    tables: dict[str, list[tuple[str, list[str]]]] = {}
    current: list[tuple[str, list[str]]] = []
    comments: list[str] = []
    for line in text.splitlines():
        if line.startswith("["):
            current = tables.setdefault(line.strip("[]"), [])
            comments = []
        elif line.startswith("#"):
            comments.append(line)
        elif line.strip():
            current.append((line.split(" = ", 1)[0], comments))
            comments = []
    return tables


def test_config_default_comments_every_key_and_every_microvm_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["config", "default"]) == 0
    text = capsys.readouterr().out
    tables = _tables(text)
    options = tables["runtimes.microvm.options"]
    assert [key for key, _ in options] == [f.name for f in dataclasses.fields(MicroVMOptions)]
    for table, keys in tables.items():
        for key, comments in keys:
            assert comments, f"{table}.{key} has no comment"
    # What it prints is a valid config, and its options are the backend's defaults.
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load(path)
    assert build_options(MicroVMOptions, config.runtimes["microvm"].options,
                         "runtimes.microvm.options") == MicroVMOptions()


def test_microvm_option_choices_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"runtimes\.microvm\.options\.accelerator"):
        build_options(MicroVMOptions, {"accelerator": "xen"}, "runtimes.microvm.options")
