"""StartContainer and the container's CRI log file (inert backend: it writes no output)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.cri_client import CRIClient, enum, msg


async def test_log_file_exists_when_start_returns(cri: CRIClient, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    pod = await cri.run_pod("logged", log_directory=str(logs))
    cid = await cri.create_container(pod, "c", pod_name="logged", log_path="c/0.log")
    assert not (logs / "c").exists()
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert (logs / "c" / "0.log").read_bytes() == b""  # created, directory and all
    status = await cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
    assert status.status.log_path == str(logs / "c" / "0.log")


async def test_start_fails_when_the_log_cannot_be_made(cri: CRIClient, tmp_path: Path) -> None:
    logs = tmp_path / "not-a-dir"
    logs.write_text("")
    pod = await cri.run_pod("unlogged", log_directory=str(logs))
    cid = await cri.create_container(pod, "c", pod_name="unlogged", log_path="0.log")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "container log" in (err.value.details() or "")
    status = await cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
    assert status.status.state == enum("CONTAINER_CREATED")  # not started


async def test_no_log_path_no_file(cri: CRIClient, tmp_path: Path) -> None:
    pod = await cri.run_pod("nolog", log_directory=str(tmp_path / "logs"))
    cid = await cri.create_container(pod, "c", pod_name="nolog")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert not (tmp_path / "logs").exists()
