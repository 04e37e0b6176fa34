"""ContainerStatus and ListContainers (and its streaming variant)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from google.protobuf import json_format

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import CriError
from criserver.runtime.filters import check_label_selector, labels_match
from criserver.runtime.runtime import Runtime, info_json
from criserver.store.records import CRI_CONTAINER_STATE, ContainerRecord, ContainerState

STREAM_CHUNK = 500


async def container_status(
    rt: Runtime, request: cri.ContainerStatusRequest
) -> cri.ContainerStatusResponse:
    container = rt.containers.get(request.container_id)
    response = cri.ContainerStatusResponse(status=container.to_cri_status())
    if request.verbose:
        pod = rt.pods.get(container.pod_id)
        info = {
            "sandboxID": pod.id,
            "config": json_format.MessageToDict(container.config),
            **await rt.backend(pod).container_info(pod, container),
        }
        response.info["info"] = info_json(info)
    return response


def _matching(rt: Runtime, f: cri.ContainerFilter | None) -> Iterator[ContainerRecord]:
    if f is not None:
        check_label_selector(f.label_selector)
    candidates: list[ContainerRecord]
    if f is not None and f.id:
        try:
            candidates = [rt.containers.get(f.id)]
        except CriError:  # unknown or ambiguous: the filter matches nothing
            candidates = []
    elif f is not None and f.pod_sandbox_id:
        try:
            candidates = rt.containers.of_pod(rt.pods.get(f.pod_sandbox_id).id)
        except CriError:
            candidates = []
    else:
        candidates = list(rt.containers.all())
    for container in candidates:
        if container.state == ContainerState.INIT:
            continue
        if f is not None:
            if f.pod_sandbox_id and not container.pod_id.startswith(f.pod_sandbox_id):
                continue
            if f.HasField("state") and CRI_CONTAINER_STATE[container.state] != f.state.state:
                continue
            if f.label_selector and not labels_match(container.config.labels, f.label_selector):
                continue
        yield container


async def list_containers(rt: Runtime, request: cri.ListContainersRequest) -> bytes:
    """The encoded ListContainersResponse, assembled from each container's cached encoding."""
    if not request.HasField("filter") or request.filter.ByteSize() == 0:
        return rt.containers.all_list_bytes(lambda c: c.state != ContainerState.INIT)
    return b"".join(rt.containers.list_item_bytes(c) for c in _matching(rt, request.filter))


async def stream_containers(
    rt: Runtime, request: cri.StreamContainersRequest
) -> AsyncIterator[bytes]:
    f = request.filter if request.HasField("filter") else None
    items = list(_matching(rt, f))
    for start in range(0, len(items), STREAM_CHUNK):
        yield b"".join(rt.containers.list_item_bytes(c) for c in items[start:start + STREAM_CHUNK])
