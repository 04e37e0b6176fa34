"""The daemon as an operator sees it: start, signals, restarts, the socket, the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.cri_client import REPO, enum, msg
from tests.daemon import Daemon


async def test_state_survives_sigkill(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    cri = daemon.client()
    ready = await cri.run_pod("ready", labels={"a": "b"})
    stopped = await cri.run_pod("stopped")
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=stopped))
    created = await cri.create_container(ready, "created")
    running = await cri.create_container(ready, "running")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=running))
    exited = await cri.create_container(ready, "exited")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=exited))
    await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=exited))
    before_pods = {p.id: p for p in (await cri.runtime.ListPodSandbox()).items}
    before = {c.id: c for c in (await cri.runtime.ListContainers()).containers}
    await cri.close()

    daemon.stop(signal.SIGKILL)
    daemon.start()
    cri = daemon.client()
    after_pods = {p.id: p for p in (await cri.runtime.ListPodSandbox()).items}
    after = {c.id: c for c in (await cri.runtime.ListContainers()).containers}
    assert after_pods == before_pods
    assert after == before
    assert after[created].state == enum("CONTAINER_CREATED")
    assert after[running].state == enum("CONTAINER_RUNNING")
    assert after[exited].state == enum("CONTAINER_EXITED")
    assert after_pods[stopped].state == enum("SANDBOX_NOTREADY")
    # Names stay reserved across the restart.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("ready")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await cri.close()
    daemon.kill()


def test_sigterm_exits_cleanly_and_socket_is_private(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o660
    assert daemon.stop(signal.SIGTERM) == 0
    assert "shutting down" in daemon.log()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "criserver.sock"))
    stale.close()  # the file stays, nobody listens
    daemon = Daemon(tmp_path).start()
    assert "replacing stale socket" in daemon.log()
    daemon.kill()


def test_second_daemon_refuses_live_socket(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = Daemon(tmp_path / "a").start()
    # Same socket, different state dir: the socket probe refuses.
    (tmp_path / "b").mkdir()
    second = Daemon(tmp_path / "b")
    second.config_path.write_text(first.config_path.read_text().replace(
        f'root = "{first.root}"', f'root = "{second.root}"').replace(
        f'state = "{first.state}"', f'state = "{second.state}"'))
    with pytest.raises(RuntimeError, match="already serving"):
        second.start()
    # Same state dir: the lock refuses.
    (tmp_path / "c").mkdir()
    third = Daemon(tmp_path / "c")
    third.config_path.write_text(first.config_path.read_text().replace(
        f'listen = "unix://{first.socket}"', f'listen = "unix://{third.socket}"'))
    with pytest.raises(RuntimeError, match="another criserver daemon is running"):
        third.start()
    first.kill()


def test_corrupt_store_is_refused_not_wiped(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.root.mkdir()
    db = daemon.root / "criserver.db"
    garbage = b"this is not a database" * 100
    db.write_bytes(garbage)
    with pytest.raises(RuntimeError, match="not a usable sqlite database"):
        daemon.start()
    assert db.read_bytes() == garbage


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    daemon.stop()
    db = daemon.root / "criserver.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="schema version 99 is newer"):
        daemon.start()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.root.mkdir()
    with sqlite3.connect(daemon.root / "criserver.db") as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(RuntimeError, match="not a criserver database"):
        daemon.start()


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.config_path.write_text(f'[daemon]\nlisten = "unix://{daemon.socket}"\nbogus = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "criserver", "serve", "--config", str(daemon.config_path)],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 2
    assert "unknown key daemon.bogus" in result.stderr


def test_sd_notify_ready(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    try:
        daemon = Daemon(tmp_path).start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    assert b"READY=1" in notify.recv(4096)
    daemon.stop()
    assert b"STOPPING=1" in notify.recv(4096)
    notify.close()


async def test_status_and_runtime_config(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    cri = daemon.client()
    status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status and conditions["NetworkReady"].status
    config = json.loads(status.info["config"])
    assert config["daemon"]["root"] == str(daemon.root)
    assert json.loads(status.info["host"])["cpus"] >= 1
    assert status.features.supplemental_groups_policy
    runtime_config = await cri.runtime.RuntimeConfig(msg("RuntimeConfigRequest"))
    assert runtime_config.linux.cgroup_driver == enum("CGROUPFS")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.UpdateRuntimeConfig(msg("UpdateRuntimeConfigRequest", runtime_config=msg(
            "RuntimeConfig", network_config=msg("NetworkConfig", pod_cidr="10.1.0.0/33"))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await cri.runtime.UpdateRuntimeConfig(msg("UpdateRuntimeConfigRequest", runtime_config=msg(
        "RuntimeConfig", network_config=msg("NetworkConfig", pod_cidr="10.244.1.0/24"))))
    await cri.close()
    daemon.stop()
    daemon.start()
    cri = daemon.client()
    status = await cri.runtime.Status(msg("StatusRequest", verbose=True))
    assert json.loads(status.info["host"])["pod_cidr"] == "10.244.1.0/24"
    await cri.close()
    daemon.kill()


async def test_not_ready_conditions_carry_reason(tmp_path: Path) -> None:
    """The micro-VM backend, as configured by default, says why it is not ready yet."""
    daemon = Daemon(tmp_path, config="").start()
    cri = daemon.client()
    status = await cri.runtime.Status(msg("StatusRequest"))
    for condition in status.status.conditions:
        if not condition.status:
            assert condition.reason and condition.message
    await cri.close()
    daemon.close()
