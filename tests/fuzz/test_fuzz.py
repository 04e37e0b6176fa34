"""The parsers' fuzz targets in the unit suite: every committed input (seeds and the inputs of
crashes found, `regress-*`) replayed in-process, then each target fuzzed briefly under atheris
(a few seconds each, coverage-guided from those seeds). Long runs: `make fuzz`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).parent / "corpus"
ROOT = Path(__file__).parents[2]
# Per target: inputs at most, seconds at most (the first bound met ends the run).
SHORT_RUNS, SHORT_SECONDS = 20_000, 4


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_committed_inputs_replay(name: str) -> None:
    inputs = sorted((CORPUS / name).iterdir())
    assert inputs, f"no seeds for {name}"
    for path in inputs:
        TARGETS[name](path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_briefly(name: str, tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.mkdir()
    proc = subprocess.run(
        ["nice", "-n", "15", sys.executable, "-m", "tests.fuzz.run", name,
         f"-runs={SHORT_RUNS}", f"-max_total_time={SHORT_SECONDS}", "-rss_limit_mb=1024",
         "-timeout=10", f"-artifact_prefix={tmp_path}/", str(new), str(CORPUS / name)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    crashes = [p.name for p in tmp_path.iterdir() if p.name != "new"]
    assert proc.returncode == 0 and not crashes, (
        f"{name}: exit {proc.returncode}, inputs kept: {crashes}\n{proc.stderr[-4000:]}")
