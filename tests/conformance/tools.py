"""Where the real CRI clients are: crictl and critest, built by `make tools` into a directory
named by the cri-tools version the Makefile pins (one source of that version)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cri_tools_version() -> str:
    found = re.search(r"^CRI_TOOLS_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert found, "the Makefile pins no CRI_TOOLS_VERSION"
    return found[1]


def cri_tool(name: str) -> Path:
    """The binary `name` ("crictl" or "critest")."""
    return built(REPO / ".tools" / f"cri-tools-{cri_tools_version()}" / name, "tools")


def built(path: Path, make_target: str) -> Path:
    """`path`, which `make <make_target>` builds; missing: a failure in CI (make test builds
    it), a skip elsewhere."""
    if not path.exists():
        message = f"{path.relative_to(REPO)} is missing: run `make {make_target}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
