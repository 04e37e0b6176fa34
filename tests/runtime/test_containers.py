"""Container semantics through the real daemon (inert test backend)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.cri_client import CRIClient, enum, msg
from tests.daemon import Daemon


async def _pod(cri: CRIClient, name: str = "pod") -> str:
    return await cri.run_pod(name, log_directory="/var/log/pods/x")


async def _state(cri: CRIClient, cid: str) -> int:
    r = await cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
    return int(r.status.state)


async def test_lifecycle(cri: CRIClient) -> None:
    pod = await _pod(cri)
    cid = await cri.create_container(pod, "app", labels={"k": "v"}, log_path="app/0.log")
    assert len(cid) == 64
    status = (await cri.runtime.ContainerStatus(
        msg("ContainerStatusRequest", container_id=cid, verbose=True)))
    assert status.status.state == enum("CONTAINER_CREATED")
    assert status.status.log_path == "/var/log/pods/x/app/0.log"
    assert status.status.image.image == "busybox"
    assert status.status.image_id.startswith("sha256:")
    assert status.status.created_at > 0 and status.status.started_at == 0
    assert "sandboxID" in status.info["info"]

    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert await _state(cri, cid) == enum("CONTAINER_RUNNING")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    for _ in range(2):  # idempotent
        await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid, timeout=1))
    status = await cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
    assert status.status.state == enum("CONTAINER_EXITED")
    assert status.status.reason == "Completed"
    assert status.status.finished_at >= status.status.started_at > 0

    for _ in range(2):  # idempotent, unknown afterwards
        await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.ContainerStatus(msg("ContainerStatusRequest", container_id=cid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_remove_running_container(cri: CRIClient) -> None:
    pod = await _pod(cri)
    cid = await cri.create_container(pod, "app")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
    assert not (await cri.runtime.ListContainers()).containers


async def test_stop_created_container_leaves_it_created(cri: CRIClient) -> None:
    pod = await _pod(cri)
    cid = await cri.create_container(pod, "app")
    await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid))
    assert await _state(cri, cid) == enum("CONTAINER_CREATED")


async def test_container_name_reserved(cri: CRIClient) -> None:
    pod = await _pod(cri)
    first = await cri.create_container(pod, "app")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.create_container(pod, "app")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await cri.create_container(pod, "app", attempt=1)
    await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=first))
    await cri.create_container(pod, "app")


async def test_stop_pod_exits_its_containers(cri: CRIClient) -> None:
    pod = await _pod(cri)
    running = await cri.create_container(pod, "a")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=running))
    created = await cri.create_container(pod, "b")
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod))
    assert await _state(cri, running) == enum("CONTAINER_EXITED")
    assert await _state(cri, created) == enum("CONTAINER_EXITED")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.create_container(pod, "c")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=created))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_filters(cri: CRIClient) -> None:
    p1, p2 = await _pod(cri, "p1"), await _pod(cri, "p2")
    a = await cri.create_container(p1, "a", labels={"role": "web"})
    b = await cri.create_container(p1, "b", labels={"role": "db"})
    c = await cri.create_container(p2, "c", labels={"role": "web"})
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=a))

    async def ids(**f: object) -> set[str]:
        r = await cri.runtime.ListContainers(msg("ListContainersRequest",
                                                 filter=msg("ContainerFilter", **f)))
        return {x.id for x in r.containers}

    assert await ids() == {a, b, c}
    assert await ids(pod_sandbox_id=p1) == {a, b}
    assert await ids(pod_sandbox_id=p2[:12]) == {c}
    assert await ids(id=b) == {b}
    assert await ids(id=b, pod_sandbox_id=p2) == set()
    assert await ids(label_selector={"role": "web"}) == {a, c}
    assert await ids(state=msg("ContainerStateValue", state=enum("CONTAINER_RUNNING"))) == {a}
    assert await ids(state=msg("ContainerStateValue", state=enum("CONTAINER_CREATED")),
                     label_selector={"role": "web"}) == {c}
    listed = await cri.runtime.ListContainers()
    one = next(x for x in listed.containers if x.id == a)
    assert one.pod_sandbox_id == p1 and one.metadata.name == "a" and one.labels["role"] == "web"


async def test_stream_containers_matches_list(cri: CRIClient) -> None:
    pod = await _pod(cri)
    ids = {await cri.create_container(pod, f"c{i}") for i in range(5)}
    streamed: set[str] = set()
    async for chunk in cri.runtime.StreamContainers(msg("StreamContainersRequest")):
        assert chunk.containers
        streamed.update(x.id for x in chunk.containers)
    assert streamed == ids


@pytest.mark.parametrize("fields", [
    {"metadata": None},
    {"name": ""},
    {"image": ""},
    {"log_path": "../../etc/passwd"},
])
async def test_bad_container_config(cri: CRIClient, fields: dict[str, object]) -> None:
    pod = await _pod(cri)
    config = cri.container_config(str(fields.get("name", "c")), image=str(fields.get("image",
                                                                                 "busybox")))
    if "metadata" in fields:
        config.ClearField("metadata")
    if "log_path" in fields:
        config.log_path = str(fields["log_path"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.CreateContainer(msg("CreateContainerRequest", pod_sandbox_id=pod,
                                              config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (await cri.runtime.ListContainers()).containers


async def test_unimplemented_calls_say_why(cri: CRIClient) -> None:
    pod = await _pod(cri)
    cid = await cri.create_container(pod, "c")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.ExecSync(msg("ExecSyncRequest", container_id=cid, cmd=["true"]))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "inert" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.CheckpointContainer(msg("CheckpointContainerRequest", container_id=cid))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer" in (err.value.details() or "")


async def test_events_reach_every_subscriber(cri: CRIClient) -> None:
    streams = [cri.runtime.GetContainerEvents(msg("GetEventsRequest")) for _ in range(2)]
    await asyncio.sleep(0.3)  # let both subscriptions register
    pod = await _pod(cri)
    cid = await cri.create_container(pod, "c")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid))
    await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
    expected = [
        (pod, "CONTAINER_CREATED_EVENT"), (pod, "CONTAINER_STARTED_EVENT"),
        (cid, "CONTAINER_CREATED_EVENT"), (cid, "CONTAINER_STARTED_EVENT"),
        (cid, "CONTAINER_STOPPED_EVENT"), (cid, "CONTAINER_DELETED_EVENT"),
    ]
    for stream in streams:
        got = []
        async for event in stream:
            got.append((event.container_id, event.container_event_type))
            assert event.created_at > 0
            assert event.pod_sandbox_status.id == pod
            if len(got) == len(expected):
                break
        assert got == [(i, enum(t)) for i, t in expected]
        stream.cancel()


async def test_metric_descriptors_and_no_metrics_without_stats(cri: CRIClient) -> None:
    descriptors = await cri.runtime.ListMetricDescriptors(msg("ListMetricDescriptorsRequest"))
    names = {d.name for d in descriptors.descriptors}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
            "container_network_receive_bytes_total"} <= names
    assert all(d.help and d.label_keys for d in descriptors.descriptors)
    await _pod(cri)
    # The inert backend has no stats: its pods have no metrics, and the call still succeeds.
    metrics = await cri.runtime.ListPodSandboxMetrics(msg("ListPodSandboxMetricsRequest"))
    assert list(metrics.pod_metrics) == []


@pytest.mark.parametrize(
    "fields",
    [{"readonly": False},  # image volumes are read-only by definition
     {"readonly": True, "host_path": "/h"},
     {"readonly": True, "image_sub_path": "../etc"},
     {"readonly": True, "image_sub_path": "/etc"}],
)
async def test_image_volume_refused(cri: CRIClient, fields: dict[str, object]) -> None:
    pod = await _pod(cri)
    mount = msg("Mount", container_path="/iv", image=msg("ImageSpec", image="sha256:" + "1" * 64),
                **fields)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.create_container(pod, "iv", mounts=[mount])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (await cri.runtime.ListContainers()).containers


async def test_status_reports_image_volumes_and_user(daemon: Daemon) -> None:
    image_id = "sha256:" + "1" * 64
    cri = daemon.client()
    pod = await _pod(cri)
    mounts = [msg("Mount", container_path="/iv", readonly=True, image_sub_path="etc",
                  image=msg("ImageSpec", image=image_id, user_specified_image="vol:1")),
              msg("Mount", container_path="/data", host_path="/h")]
    security = msg("LinuxContainerSecurityContext", run_as_user=msg("Int64Value", value=1000),
                   supplemental_groups=[1000, 1234])
    cid = await cri.create_container(pod, "iv", mounts=mounts, linux=msg(
        "LinuxContainerConfig", security_context=security))
    await cri.close()
    daemon.stop()  # what is reported survives a restart
    daemon.start()
    cri = daemon.client()
    status = (await cri.runtime.ContainerStatus(
        msg("ContainerStatusRequest", container_id=cid))).status
    by_path = {m.container_path: m for m in status.mounts}
    assert by_path["/iv"].image.image_ref == image_id
    assert by_path["/iv"].image.user_specified_image == "vol:1"
    assert by_path["/iv"].image_sub_path == "etc" and by_path["/iv"].readonly
    assert by_path["/data"].host_path == "/h" and not by_path["/data"].HasField("image")
    user = status.user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (1000, 1000, [1000, 1234])
    await cri.close()
