"""Which agent channel the micro-VM backend gives a pod (vsock cannot run on this host: no
/dev/vhost-vsock, so the choice itself is what is tested here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.backend import MicroVMBackend
from criserver.config import Config, ConfigError
from criserver.errors import InvalidArgument
from criserver.runtime.backend import BackendContext
from criserver.store.records import PodRecord
from criserver.vm.qemu import SerialTransport, VsockTransport
from tests.vm.test_template import pod_spec
from vmagent.contract import AGENT_PORT_NAME

POD_ID = "ab" * 32


def backend(tmp_path: Path, transport: str) -> MicroVMBackend:
    context = BackendContext(handler="microvm", root=tmp_path / "root", state=tmp_path / "state",
                             config=Config(), events=None)  # type: ignore[arg-type]
    return MicroVMBackend({"transport": transport}, context)


def pod(**backend_data: object) -> PodRecord:
    return PodRecord(id=POD_ID, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                     created_at=1, backend=dict(backend_data))


def test_serial_by_choice(tmp_path: Path) -> None:
    b = backend(tmp_path, "serial")
    transport = b.agent_transport(pod())
    assert transport == SerialTransport(tmp_path / "state" / POD_ID[:16] / "agent.sock",
                                        AGENT_PORT_NAME)
    assert b.agent_client(pod()).address.unix_path == str(transport.socket_path)


def test_vsock_by_choice_and_kept_across_restarts(tmp_path: Path) -> None:
    b = backend(tmp_path, "vsock")
    transport = b.agent_transport(pod())
    assert isinstance(transport, VsockTransport) and transport.guest_cid >= 3
    assert b.agent_client(pod()).address.vsock_cid == transport.guest_cid
    # A pod started over virtio-serial stays on it, whatever the host has now.
    assert isinstance(b.agent_transport(pod(qemuPid=1)), SerialTransport)
    assert b.agent_transport(pod(vsockCid=77)) == VsockTransport(77)


def test_a_pooled_vm_gets_a_channel_of_its_own_of_the_pods_kind(tmp_path: Path) -> None:
    b = backend(tmp_path, "auto")
    like = pod_spec("a", transport=VsockTransport(77))
    transport = b._pool_transport("pool-0a1b2c3d", like)
    assert isinstance(transport, VsockTransport) and transport.guest_cid == 3 + 0x0A1B2C3D
    assert b._pool_transport("pool-0a1b2c3d", pod_spec("a")) == SerialTransport(
        tmp_path / "state" / "pool-0a1b2c3d" / "agent.sock", AGENT_PORT_NAME)


def test_auto_follows_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = backend(tmp_path, "auto")
    monkeypatch.setattr("os.path.exists", lambda p: p == "/dev/vhost-vsock")
    assert isinstance(b.agent_transport(pod()), VsockTransport)
    monkeypatch.setattr("os.path.exists", lambda p: False)
    assert isinstance(b.agent_transport(pod()), SerialTransport)


def test_a_warm_pool_without_templates_is_refused(tmp_path: Path) -> None:
    context = BackendContext(handler="microvm", root=tmp_path / "root", state=tmp_path / "state",
                             config=Config(), events=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="warm_pool"):
        MicroVMBackend({"warm_pool": 1, "templates": False}, context)


def test_the_default_pool_is_one_and_goes_quietly_without_templates(tmp_path: Path) -> None:
    context = BackendContext(handler="microvm", root=tmp_path / "root", state=tmp_path / "state",
                             config=Config(), events=None)  # type: ignore[arg-type]
    pooled = MicroVMBackend({}, context).pool
    assert pooled is not None and pooled.size == 1
    assert MicroVMBackend({"templates": False}, context).pool is None
    assert MicroVMBackend({"warm_pool": 0}, context).pool is None


def test_bad_transport_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="transport"):
        backend(tmp_path, "carrier-pigeon")


def test_the_agent_call_timeout_is_the_handlers_option(tmp_path: Path) -> None:
    context = BackendContext(handler="microvm", root=tmp_path / "root", state=tmp_path / "state",
                             config=Config(), events=None)  # type: ignore[arg-type]
    assert MicroVMBackend({}, context).agent_client(pod()).call_timeout == 10.0
    slow_host = MicroVMBackend({"agent_call_timeout": 30}, context)
    assert slow_host.agent_client(pod()).call_timeout == 30.0
    with pytest.raises(ConfigError, match="agent_call_timeout"):
        MicroVMBackend({"agent_call_timeout": 0}, context)
