"""Standalone-node fixtures: a real kubelet (no API server) on the micro-VM daemon, which reaches
the conformance images through the test registry's mirrors (tests/conformance/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import conformance_daemon, conformance_images  # noqa: F401
from tests.daemon import Daemon
from tests.kubelet.node import REPO, KubeletNode, kubelet_binary, running_node

pytestmark = pytest.mark.vm


@pytest.fixture(scope="session")
def kubelet() -> Path:
    """The binary `make kubelet` builds; missing: a failure in CI (make test builds it), a
    skip elsewhere."""
    path = kubelet_binary()
    if not path.exists():
        message = f"{path.relative_to(REPO)} is missing: run `make kubelet`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def node(kubelet: Path, conformance_daemon: Daemon) -> Iterator[KubeletNode]:  # noqa: F811
    """One kubelet per test module on the module's daemon; its log stays in build/kubelet/."""
    with running_node(conformance_daemon, kubelet) as started:
        yield started
