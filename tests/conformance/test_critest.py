"""critest, cri-tools' CRI conformance suite, against the real daemon with micro-VM pods.

Each spec's outcome is held against critest-expectations.toml: a spec not listed there must
pass; a listed one must end as listed; the suite's size must match. The ginkgo JSON report, the
suite's output and the daemon's log stay in build/critest/ for a developer to read."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conformance.critest import load_expectations, read_report, summary, verdict
from tests.conformance.tools import REPO, cri_tool
from tests.daemon import Daemon

pytestmark = pytest.mark.vm

REPORT_DIR = REPO / "build" / "critest"
SUITE_TIMEOUT_MIN = 40


def test_critest(conformance_daemon: Daemon) -> None:
    critest = cri_tool("critest")
    shutil.rmtree(REPORT_DIR, ignore_errors=True)
    REPORT_DIR.mkdir(parents=True)
    endpoint = f"unix://{conformance_daemon.socket}"
    config = REPORT_DIR / "crictl.yaml"  # else critest warns that /etc/crictl.yaml is missing
    config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n")
    with open(REPORT_DIR / "critest.log", "wb") as log:
        run = subprocess.run(
            [str(critest), f"--config={config}", f"--runtime-endpoint={endpoint}",
             f"--image-endpoint={endpoint}",
             f"--ginkgo.json-report={REPORT_DIR / 'report.json'}", "--ginkgo.no-color",
             f"--ginkgo.timeout={SUITE_TIMEOUT_MIN}m"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPORT_DIR,
            timeout=(SUITE_TIMEOUT_MIN + 5) * 60, check=False,
        )
    shutil.copy(conformance_daemon.log_path, REPORT_DIR / "daemon.log")
    report = REPORT_DIR / "report.json"
    assert report.exists(), (f"critest exited {run.returncode} without a report; its output: "
                             f"{(REPORT_DIR / 'critest.log').read_text()[-3000:]}")
    results = read_report(report)
    total, expected = load_expectations()
    problems = verdict(results, total, expected)
    print(f"critest: {summary(results)}; report in {report.relative_to(REPO)}")
    assert not problems, "critest differs from critest-expectations.toml:\n" + "\n".join(problems)
