"""Reads critest's ginkgo JSON report and holds it against the expectations file: the specs that
may not pass on this host, each with its state and reason. Everything else must pass."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

EXPECTATIONS = Path(__file__).with_name("critest-expectations.toml")
# Ginkgo's states that are not a pass or a deliberate skip.
FAILED_STATES = {"failed", "panicked", "timedout", "interrupted", "aborted"}


@dataclass(frozen=True)
class SpecResult:
    name: str  # the container texts and the It text, joined by spaces, as ginkgo prints them
    state: str  # "passed", "skipped", or one of FAILED_STATES
    message: str  # the failure or skip message


@dataclass(frozen=True)
class Expectation:
    state: str  # "failed" or "skipped"
    reason: str
    owner: str  # the issue or host fact that owns it


def read_report(path: Path) -> list[SpecResult]:
    """The It specs of a ginkgo JSON report (suite set-up nodes left out)."""
    results = []
    for suite in json.loads(path.read_text()):
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*spec.get("ContainerHierarchyTexts", []), spec["LeafNodeText"]])
            failure = spec.get("Failure") or {}
            results.append(SpecResult(name, spec["State"], failure.get("Message", "")))
    return results


def load_expectations(path: Path = EXPECTATIONS) -> tuple[int, dict[str, Expectation]]:
    """(the number of specs the suite has, expectations by spec name)."""
    doc = tomllib.loads(path.read_text())
    expected: dict[str, Expectation] = {}
    for entry in doc.get("spec", []):
        if entry["name"] in expected:
            raise ValueError(f"{path.name}: {entry['name']!r} is listed twice")
        if entry["state"] not in ("failed", "skipped") or not entry.get("reason"):
            raise ValueError(f"{path.name}: {entry['name']!r} needs a state and a reason")
        expected[entry["name"]] = Expectation(entry["state"], entry["reason"], entry["owner"])
    return int(doc["total"]), expected


def verdict(results: list[SpecResult], total: int,
            expected: dict[str, Expectation]) -> list[str]:
    """Every way the run differs from the expectations, one line each; empty: as expected."""
    problems = []
    if len(results) != total:
        problems.append(f"critest ran {len(results)} specs, the expectations say {total}")
    seen = set()
    for result in results:
        seen.add(result.name)
        expectation = expected.get(result.name)
        state = "failed" if result.state in FAILED_STATES else result.state
        if state == "passed" and expectation is None:
            continue
        if expectation is None:
            first_line = result.message.strip().splitlines()[0] if result.message.strip() else ""
            problems.append(f"{result.state}: {result.name}: {first_line[:300]}")
        elif state != expectation.state:
            problems.append(f"{result.state} (expected {expectation.state}: "
                            f"{expectation.reason}): {result.name}")
    for name in sorted(set(expected) - seen):
        problems.append(f"listed in {EXPECTATIONS.name} but not run: {name}")
    return problems


def summary(results: list[SpecResult]) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.state] = counts.get(result.state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
