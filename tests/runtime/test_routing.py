"""Which handler serves a pod that names none: the routing table, and its config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import ConfigError, RuntimeConfig, load
from criserver.runtime.routing import Route, route
from tests.cri_client import enum, msg
from tests.daemon import INERT_BACKEND, Daemon

ROUTED = RuntimeConfig(default_handler="microvm", host_namespaces_handler="runc",
                       privileged_handler="trusted")


def pod(network: int = cri.POD, pid: int = cri.CONTAINER, ipc: int = cri.POD,
        privileged: bool = False) -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig()
    security = config.linux.security_context
    security.namespace_options.network = network
    security.namespace_options.pid = pid
    security.namespace_options.ipc = ipc
    security.privileged = privileged
    return config


@pytest.mark.parametrize(("requested", "config", "want"), [
    ("", pod(), Route("microvm")),
    ("", pod(network=cri.NODE), Route("runc", "node namespaces (network): "
                                              "runtime.host_namespaces_handler")),
    ("", pod(pid=cri.NODE, ipc=cri.NODE), Route("runc", "node namespaces (pid, ipc): "
                                                       "runtime.host_namespaces_handler")),
    ("", pod(privileged=True), Route("trusted", "privileged: runtime.privileged_handler")),
    # Node namespaces decide before privilege.
    ("", pod(network=cri.NODE, privileged=True), Route("runc", "node namespaces (network): "
                                                             "runtime.host_namespaces_handler")),
    # A named handler is never rerouted, whatever the pod asks for.
    ("microvm", pod(network=cri.NODE, privileged=True), Route("microvm")),
    ("kata", pod(), Route("kata")),
])
def test_routing_table(requested: str, config: cri.PodSandboxConfig, want: Route) -> None:
    assert route(ROUTED, requested, config) == want


def test_without_routes_every_pod_gets_the_default_handler() -> None:
    default = RuntimeConfig(default_handler="microvm", host_namespaces_handler="",
                            privileged_handler="")
    for config in (pod(network=cri.NODE), pod(pid=cri.NODE), pod(privileged=True)):
        assert route(default, "", config) == Route("microvm")


@pytest.mark.parametrize("key", ["host_namespaces_handler", "privileged_handler"])
def test_a_route_to_an_unconfigured_handler_is_refused_at_load(tmp_path: Path, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[runtime]\n{key} = "runc"\n[runtimes.microvm]\nbackend = "microvm"\n')
    with pytest.raises(ConfigError, match=rf"runtime\.{key}: no \[runtimes\.runc\] table"):
        load(path)
    path.write_text(f'[runtime]\n{key} = "runc"\n[runtimes.microvm]\nbackend = "microvm"\n'
                    '[runtimes.runc]\nbackend = "microvm"\n')
    assert getattr(load(path).runtime, key) == "runc"


def test_host_namespace_and_privileged_pods_go_to_runc_by_default(tmp_path: Path) -> None:
    assert load(None).runtime.host_namespaces_handler == "runc"
    assert load(None).runtime.privileged_handler == "runc"
    assert "runc" in load(None).runtimes
    # A runtimes table of its own without runc: the embedded route is dropped, not an error.
    path = tmp_path / "config.toml"
    path.write_text('[runtimes.microvm]\nbackend = "microvm"\n')
    assert load(path).runtime.host_namespaces_handler == ""
    assert load(path).runtime.privileged_handler == ""


async def test_the_daemon_routes_a_host_network_pod_and_says_so(tmp_path: Path) -> None:
    """Through the real daemon: two handlers, node-namespace pods routed to the second."""
    config = (f'[runtime]\ndefault_handler = "inert"\nhost_namespaces_handler = "host"\n'
              f'[runtimes.inert]\nbackend = "{INERT_BACKEND}"\n'
              f'[runtimes.host]\nbackend = "{INERT_BACKEND}"\n')
    daemon = Daemon(tmp_path, config=config).start()
    cri_client = daemon.client()
    try:
        host = await cri_client.run_pod("host", linux=msg("LinuxPodSandboxConfig",
            security_context=msg("LinuxSandboxSecurityContext", namespace_options=msg(
                "NamespaceOption", network=enum("NODE")))))
        plain = await cri_client.run_pod("plain")
        named = await cri_client.run_pod("named", handler="inert", linux=msg(
            "LinuxPodSandboxConfig", security_context=msg(
                "LinuxSandboxSecurityContext", namespace_options=msg(
                    "NamespaceOption", network=enum("NODE")))))
        handlers, routed = {}, {}
        for pod_id in (host, plain, named):
            status = await cri_client.runtime.PodSandboxStatus(
                msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id, verbose=True))
            handlers[status.status.metadata.name] = status.status.runtime_handler
            routed[status.status.metadata.name] = json.loads(status.info["info"]).get("routedBy")
        assert handlers == {"host": "host", "plain": "inert", "named": "inert"}
        assert routed == {"host": "node namespaces (network): runtime.host_namespaces_handler",
                          "plain": None, "named": None}
        assert "pod routed name=default/host handler=host reason=node namespaces (network)" \
            in daemon.log()
    finally:
        await cri_client.close()
        daemon.close()
