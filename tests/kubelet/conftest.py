"""Standalone-node fixtures: a real kubelet (no API server) on the micro-VM daemon, which reaches
the conformance images through the test registry's mirrors (tests/conformance/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import conformance_daemon, conformance_images  # noqa: F401
from tests.conformance.tools import built
from tests.daemon import Daemon
from tests.kubelet.node import KubeletNode, kubelet_binary, running_node

pytestmark = pytest.mark.vm


@pytest.fixture(scope="session")
def kubelet() -> Path:
    """The binary `make kubelet` builds."""
    return built(kubelet_binary(), "kubelet")


@pytest.fixture(scope="module")
def node(kubelet: Path, conformance_daemon: Daemon) -> Iterator[KubeletNode]:  # noqa: F811
    """One kubelet per test module on the module's daemon; its log stays in build/kubelet/."""
    with running_node(conformance_daemon, kubelet) as started:
        yield started


@pytest.fixture
def log_mark(node: KubeletNode) -> int:
    """Where kubelet's log stood when the test began."""
    return node.log_lines()
