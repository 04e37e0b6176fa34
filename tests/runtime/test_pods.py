"""Pod sandbox semantics through the real daemon (inert test backend)."""

from __future__ import annotations

import grpc
import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime import validate
from tests.cri_client import CRIClient, enum, msg


async def test_version(cri: CRIClient) -> None:
    v = await cri.runtime.Version(msg("VersionRequest", version="v1"))
    assert v.runtime_name == "criserver"
    assert v.runtime_api_version == "v1"
    assert v.runtime_version


async def test_run_status_list(cri: CRIClient) -> None:
    pod_id = await cri.run_pod("web", labels={"app": "web"}, hostname="web-0")
    assert len(pod_id) == 64 and int(pod_id, 16) >= 0
    status = await cri.runtime.PodSandboxStatus(
        msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id, verbose=True))
    assert status.status.id == pod_id
    assert status.status.state == enum("SANDBOX_READY")
    assert status.status.metadata.name == "web"
    assert status.status.labels["app"] == "web"
    assert status.status.created_at > 1_600_000_000 * 10**9  # nanoseconds
    assert status.status.network.ip == "10.0.0.1"
    assert '"inert": true' in status.info["info"]
    listed = await cri.runtime.ListPodSandbox()
    assert [p.id for p in listed.items] == [pod_id]
    assert listed.items[0].runtime_handler == "inert"


async def test_prefix_lookup(cri: CRIClient) -> None:
    pod_id = await cri.run_pod("p")
    status = await cri.runtime.PodSandboxStatus(
        msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id[:8]))
    assert status.status.id == pod_id


async def test_name_reserved_while_pod_exists(cri: CRIClient) -> None:
    pod_id = await cri.run_pod("dup")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("dup")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert pod_id in (err.value.details() or "")
    # Another attempt is another name.
    await cri.run_pod("dup", attempt=1)
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    await cri.run_pod("dup")  # free again once removed


async def test_stop_and_remove_are_idempotent(cri: CRIClient) -> None:
    pod_id = await cri.run_pod("idem")
    for _ in range(2):
        await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))
    status = await cri.runtime.PodSandboxStatus(
        msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id))
    assert status.status.state == enum("SANDBOX_NOTREADY")
    for _ in range(2):
        await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest", pod_sandbox_id=pod_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Unknown IDs: stop and remove have nothing to do and say so with success.
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id="f" * 64))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id="f" * 64))


async def test_remove_ready_pod_stops_it_and_its_containers(cri: CRIClient) -> None:
    pod_id = await cri.run_pod("force")
    cid = await cri.create_container(pod_id, "c", pod_name="force")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    assert not (await cri.runtime.ListContainers()).containers
    assert not (await cri.runtime.ListPodSandbox()).items


async def test_list_filters(cri: CRIClient) -> None:
    a = await cri.run_pod("a", labels={"tier": "front", "app": "x"})
    b = await cri.run_pod("b", labels={"tier": "back", "app": "x"})
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=b))

    async def ids(**filter_fields: object) -> set[str]:
        r = await cri.runtime.ListPodSandbox(msg("ListPodSandboxRequest",
                                                 filter=msg("PodSandboxFilter", **filter_fields)))
        return {p.id for p in r.items}

    assert await ids() == {a, b}
    assert await ids(id=a) == {a}
    assert await ids(id=a[:10]) == {a}
    assert await ids(id="0" * 64) == set()
    assert await ids(label_selector={"app": "x"}) == {a, b}
    assert await ids(label_selector={"app": "x", "tier": "back"}) == {b}
    assert await ids(label_selector={"tier": "nope"}) == set()
    ready = msg("PodSandboxStateValue", state=enum("SANDBOX_READY"))
    notready = msg("PodSandboxStateValue", state=enum("SANDBOX_NOTREADY"))
    assert await ids(state=ready) == {a}
    assert await ids(state=notready) == {b}
    assert await ids(state=ready, label_selector={"tier": "back"}) == set()


@pytest.mark.parametrize("selector", [{"": "x"}, {"bad key!": "x"}, {"a": "bad value!"},
                                      {"a" * 64: "x"}])
async def test_invalid_label_selector(cri: CRIClient, selector: dict[str, str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.ListPodSandbox(msg("ListPodSandboxRequest", filter=msg(
            "PodSandboxFilter", label_selector=selector)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("config", [
    {},  # no metadata at all
    {"metadata": {"name": "", "namespace": "ns", "uid": "u"}},
    {"metadata": {"name": "n", "namespace": "", "uid": "u"}},
    {"metadata": {"name": "n", "namespace": "ns", "uid": ""}},
    {"metadata": {"name": "n" * 300, "namespace": "ns", "uid": "u"}},
    {"metadata": {"name": "n", "namespace": "ns", "uid": "u"}, "hostname": "h" * 100},
    {"metadata": {"name": "n", "namespace": "ns", "uid": "u"},
     "annotations": {"big": "x" * 300_000}},
])
async def test_bad_pod_config(cri: CRIClient, config: dict[str, object]) -> None:
    fields = dict(config)
    if "metadata" in fields:
        fields["metadata"] = msg("PodSandboxMetadata", **fields["metadata"])  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.RunPodSandbox(msg("RunPodSandboxRequest",
                                            config=msg("PodSandboxConfig", **fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (await cri.runtime.ListPodSandbox()).items


def _userns(mode: str, *mappings: tuple[int, int, int]) -> object:
    ids = [msg("IDMapping", container_id=c, host_id=h, length=n) for c, h, n in mappings]
    return msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", namespace_options=msg(
            "NamespaceOption", userns_options=msg("UserNamespace", mode=mode, uids=ids,
                                                  gids=ids))))


@pytest.mark.parametrize("linux", [
    # critest's UserNamespaces refusals, at RunPodSandbox
    _userns("POD", (0, 1000, 100000), (0, 2000, 100000)),
    _userns("POD", (1, 1000, 100000)),
    _userns("CONTAINER"),
    _userns("TARGET"),
    _userns("POD"),  # no mappings
    _userns("POD", (0, 1000, 0)),
    _userns("POD", (0, 2**32 - 10, 100)),
    _userns("NODE", (0, 1000, 100)),
], ids=["two-mappings", "root-unmapped", "container", "target", "no-mappings", "empty",
        "overflow", "node-with-mappings"])
async def test_bad_user_namespace(cri: CRIClient, linux: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("userns", linux=linux)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user namespace" in (err.value.details() or "")
    assert not (await cri.runtime.ListPodSandbox()).items


def test_user_namespace_modes() -> None:
    def options(mode: int, n: int = 1) -> cri.NamespaceOption:
        ids = [cri.IDMapping(container_id=0, host_id=1000, length=65536)] * n
        return cri.NamespaceOption(userns_options=cri.UserNamespace(mode=mode, uids=ids,
                                                                    gids=ids))

    assert validate.user_namespace(options(cri.POD)) is True
    assert validate.user_namespace(options(cri.NODE, 0)) is False
    assert validate.user_namespace(cri.NamespaceOption()) is False


async def test_unknown_handler(cri: CRIClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("h", handler="nosuch")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nosuch" in (err.value.details() or "")


async def test_failed_run_leaves_nothing(cri: CRIClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("boom", annotations={"test/fail-run": "1"})
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert not (await cri.runtime.ListPodSandbox()).items
    await cri.run_pod("boom")  # the name was released


async def test_unknown_ids_not_found(cri: CRIClient) -> None:
    for call, request in [
        (cri.runtime.PodSandboxStatus, msg("PodSandboxStatusRequest", pod_sandbox_id="ab" * 32)),
        (cri.runtime.ContainerStatus, msg("ContainerStatusRequest", container_id="ab" * 32)),
        (cri.runtime.StartContainer, msg("StartContainerRequest", container_id="ab" * 32)),
        (cri.runtime.CreateContainer, msg("CreateContainerRequest", pod_sandbox_id="ab" * 32,
                                          config=cri.container_config("c"))),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, call
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest", pod_sandbox_id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stop_and_remove_of_unknown_ids_succeed(cri: CRIClient) -> None:
    """The CRI: stop and remove are idempotent, no error once the object is stopped or gone."""
    unknown = "ab" * 32
    await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=unknown))
    await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=unknown))
    await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=unknown))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=unknown))
    pod_id = await cri.run_pod("gone")
    cid = await cri.create_container(pod_id, "c", pod_name="gone")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    await cri.runtime.RemovePodSandbox(msg("RemovePodSandboxRequest", pod_sandbox_id=pod_id))
    for _ in range(2):  # the container went with its pod
        await cri.runtime.StopContainer(msg("StopContainerRequest", container_id=cid, timeout=1))
        await cri.runtime.RemoveContainer(msg("RemoveContainerRequest", container_id=cid))
        await cri.runtime.StopPodSandbox(msg("StopPodSandboxRequest", pod_sandbox_id=pod_id))


async def test_stop_and_remove_refuse_an_empty_id(cri: CRIClient) -> None:
    for call, request in [
        (cri.runtime.StopContainer, msg("StopContainerRequest", container_id="")),
        (cri.runtime.RemoveContainer, msg("RemoveContainerRequest", container_id="")),
        (cri.runtime.StopPodSandbox, msg("StopPodSandboxRequest", pod_sandbox_id="")),
        (cri.runtime.RemovePodSandbox, msg("RemovePodSandboxRequest", pod_sandbox_id="")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, call
        assert "must not be empty" in (err.value.details() or ""), call


async def test_ambiguous_prefix(cri: CRIClient) -> None:
    ids = [await cri.run_pod(f"amb{i}") for i in range(40)]
    # With 40 random ids, some pair shares its first hex digit.
    first = [i[0] for i in ids]
    shared = next(c for c in first if first.count(c) > 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.PodSandboxStatus(msg("PodSandboxStatusRequest", pod_sandbox_id=shared))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ambiguous" in (err.value.details() or "")


@pytest.mark.parametrize("linux", [
    msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", namespace_options=msg(
            "NamespaceOption", userns_options=msg("UserNamespace", mode=-1)))),
    msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", namespace_options=msg("NamespaceOption", network=7))),
    msg("LinuxPodSandboxConfig", security_context=msg(
        "LinuxSandboxSecurityContext", seccomp=msg("SecurityProfile", profile_type=99))),
], ids=["userns-mode", "network-mode", "seccomp-type"])
async def test_enum_values_no_cri_defines_are_refused(cri: CRIClient, linux: object) -> None:
    # proto3 enums are open: the CRI fuzz test sent userns mode -1 and got INTERNAL (naming
    # the mode failed); a network mode 7 ran a pod with whatever a backend made of it.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("enums", linux=linux)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "is not a value of" in (err.value.details() or "")
    assert not (await cri.runtime.ListPodSandbox()).items


async def test_enum_values_in_containers_and_port_mappings(cri: CRIClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.run_pod("ports", port_mappings=[msg("PortMapping", protocol=5,
                                                      container_port=80)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    pod = await cri.run_pod("mounts")
    config = cri.container_config("c", mounts=[msg("Mount", container_path="/x",
                                                   host_path="/tmp", propagation=42)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.CreateContainer(msg("CreateContainerRequest", pod_sandbox_id=pod,
                                              config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "propagation = 42" in (err.value.details() or "")
