"""The critest verdict: what counts as a difference from the expectations file."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conformance.critest import (
    EXPECTATIONS,
    Expectation,
    SpecResult,
    load_expectations,
    read_report,
    verdict,
)

SKIP = Expectation("skipped", "AppArmor is off on this host", "host")


def test_report_keeps_it_specs_with_their_full_names(tmp_path: Path) -> None:
    report = [{"SpecReports": [
        {"LeafNodeType": "BeforeSuite", "LeafNodeText": "", "State": "passed"},
        {"LeafNodeType": "It", "ContainerHierarchyTexts": ["[sig-node] Container", "runtime"],
         "LeafNodeText": "should work", "State": "failed",
         "Failure": {"Message": "boom\nmore"}},
    ]}]
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert read_report(tmp_path / "r.json") == [
        SpecResult("[sig-node] Container runtime should work", "failed", "boom\nmore")]


def test_as_expected_is_no_problem() -> None:
    results = [SpecResult("a", "passed", ""), SpecResult("b", "skipped", "off")]
    assert verdict(results, 2, {"b": SKIP}) == []


def test_unlisted_failure_skip_and_count_are_problems() -> None:
    results = [SpecResult("a", "failed", "boom\nmore"), SpecResult("b", "skipped", "why")]
    problems = verdict(results, 3, {})
    assert problems == ["critest ran 2 specs, the expectations say 3",
                        "failed: a: boom", "skipped: b: why"]


def test_a_listed_spec_that_passes_or_is_missing_is_a_problem() -> None:
    problems = verdict([SpecResult("b", "passed", "")], 1, {"b": SKIP, "c": SKIP})
    assert problems[0].startswith("passed (expected skipped")
    assert problems[1] == f"listed in {EXPECTATIONS.name} but not run: c"


def test_timeouts_and_panics_count_as_failures() -> None:
    failed = Expectation("failed", "needs the host backend", "issue 14")
    assert verdict([SpecResult("a", "timedout", "")], 1, {"a": failed}) == []


def test_the_expectations_file_gives_every_entry_a_reason() -> None:
    total, expected = load_expectations()
    assert total > len(expected)
    assert all(e.reason and e.owner for e in expected.values())
