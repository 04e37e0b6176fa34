"""Status as crictl info shows it: the runtime handlers, their features and readiness."""

from __future__ import annotations

import json
import os
from pathlib import Path

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend
from criserver.runtime import runtime_info
from criserver.runtime.backend import BackendFeatures, BaseBackend
from tests.backends.unready import UnreadyBackend
from tests.cri_client import msg
from tests.daemon import INERT_BACKEND, Daemon
from tests.runtime.inprocess import in_process

TWO_HANDLERS = f"""
[runtime]
default_handler = "plain"
[runtimes.plain]
backend = "{INERT_BACKEND}"
[runtimes.featured]
backend = "tests.backends.featured:FeaturedBackend"
"""


async def test_status_lists_the_default_and_every_handler_by_name(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, config=TWO_HANDLERS).start()
    cri = daemon.client()
    try:
        status = await cri.runtime.Status(msg("StatusRequest"))
        handlers = {h.name: (h.features.recursive_read_only_mounts, h.features.user_namespaces)
                    for h in status.runtime_handlers}
        assert len(handlers) == len(status.runtime_handlers)  # names are unique
        assert handlers == {"": (False, False), "plain": (False, False),
                            "featured": (True, True)}
    finally:
        await cri.close()
        daemon.kill()


async def test_the_default_handler_carries_its_own_features(tmp_path: Path) -> None:
    config = TWO_HANDLERS.replace('default_handler = "plain"', 'default_handler = "featured"')
    daemon = Daemon(tmp_path, config=config).start()
    cri = daemon.client()
    try:
        status = await cri.runtime.Status(msg("StatusRequest"))
        default = [h for h in status.runtime_handlers if h.name == ""]
        assert len(default) == 1 and default[0].features.recursive_read_only_mounts
        assert default[0].features.user_namespaces
    finally:
        await cri.close()
        daemon.kill()


def test_backends_declare_features() -> None:
    # A backend supports nothing it does not declare; each declares its own in one place.
    assert BaseBackend.features == BackendFeatures()
    assert isinstance(MicroVMBackend.features, BackendFeatures)
    assert "features" in vars(MicroVMBackend)


async def test_status_counts_every_handler(tmp_path: Path) -> None:
    async with in_process(tmp_path / "db") as p:
        default = p.rt.config.runtime.default_handler
        request = cri.StatusRequest(verbose=True)
        ready = await runtime_info.status(p.rt, request)
        assert all(c.status and not c.reason and not c.message
                   for c in ready.status.conditions)
        p.rt.backends["slow"] = UnreadyBackend({}, p.backend.context)
        status = await runtime_info.status(p.rt, request)
        conditions = {c.type: c for c in status.status.conditions}
        runtime, network = conditions["RuntimeReady"], conditions["NetworkReady"]
        assert (runtime.status, runtime.reason, runtime.message) == (
            False, "GuestAssetsMissing", "runtime handler 'slow': no kernel")
        assert (network.status, network.reason, network.message) == (
            False, "NetworkPluginNotReady", "runtime handler 'slow': no CNI")
        assert json.loads(status.info["runtime.slow"]) == {"backend": "unready"}
        assert f"runtime.{default}" in status.info
        daemon = json.loads(status.info["daemon"])
        assert daemon["pid"] == os.getpid() and daemon["rssBytes"] > 0
        assert daemon["openFds"] > 0 and daemon["threads"] >= 1
        assert daemon["asyncioTasks"] >= 1  # this test's own task
