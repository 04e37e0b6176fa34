"""Conformance fixtures: the images critest and crictl pull, pushed once to a real loopback
registry, and a micro-VM daemon that reaches them through registry mirrors under their
upstream names (no upstream host is contacted: their images are all on the mirror)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conformance.images import push_all
from tests.daemon import Daemon
from tests.e2e.conftest import handler_config, running_vm_daemon
from tests.registry import Registry

pytestmark = pytest.mark.vm

# The registries critest's image references name.
UPSTREAM_REGISTRIES = ("registry.k8s.io", "k8s.gcr.io", "gcr.io", "docker.io")


@pytest.fixture(scope="session")
async def conformance_images(registry: Registry) -> list[str]:
    """Every image critest pulls, pushed to the test registry: their repository paths."""
    return await push_all(registry.base)


def mirror_config(registry: Registry) -> str:
    mirrors = ", ".join(f'"{name}" = ["http://{registry.host}"]' for name in UPSTREAM_REGISTRIES)
    return f"[image]\nmirrors = {{ {mirrors} }}\n"


@pytest.fixture(scope="module")
def conformance_daemon(registry: Registry, conformance_images: list[str]) -> Iterator[Daemon]:
    """The daemon as `make run` starts it (micro-VM pods with its default warm pool, pods that
    share the node's namespaces on runc), plus the registry mirrors."""
    with running_vm_daemon(mirror_config(registry) + handler_config("runc", "runc"),
                           warm_pool=None) as daemon:
        yield daemon
