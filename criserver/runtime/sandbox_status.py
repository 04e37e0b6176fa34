"""PodSandboxStatus and ListPodSandbox (and its streaming variant)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import CriError
from criserver.runtime.filters import check_label_selector, labels_match
from criserver.runtime.runtime import Runtime, info_json
from criserver.store.records import CRI_POD_STATE, ContainerState, PodRecord, PodState

STREAM_CHUNK = 500


async def pod_sandbox_status(
    rt: Runtime, request: cri.PodSandboxStatusRequest
) -> cri.PodSandboxStatusResponse:
    pod = rt.pods.get(request.pod_sandbox_id)
    response = cri.PodSandboxStatusResponse(status=pod.to_cri_status(), timestamp=time.time_ns())
    response.containers_statuses.extend(
        c.to_cri_status() for c in rt.containers.of_pod(pod.id) if c.state != ContainerState.INIT
    )
    if request.verbose:
        info = {
            "runtimeHandler": pod.runtime_handler,
            **({"routedBy": pod.routed_by} if pod.routed_by else {}),
            "state": pod.state.value,
            "reason": pod.reason,
            "message": pod.message,
            "config": _config_json(pod),
            **await rt.backend(pod).sandbox_info(pod),
        }
        response.info["info"] = info_json(info)
    return response


def _config_json(pod: PodRecord) -> object:
    from google.protobuf import json_format

    return json_format.MessageToDict(pod.config)


def _matching(rt: Runtime, f: cri.PodSandboxFilter | None) -> Iterator[PodRecord]:
    if f is not None:
        check_label_selector(f.label_selector)
    candidates: list[PodRecord]
    if f is not None and f.id:
        pod = _find_by_prefix(rt, f.id)
        candidates = [pod] if pod is not None else []
    else:
        candidates = list(rt.pods.all())
    for pod in candidates:
        if pod.state == PodState.INIT:
            continue
        if f is not None:
            if f.HasField("state") and CRI_POD_STATE[pod.state] != f.state.state:
                continue
            if f.label_selector and not labels_match(pod.config.labels, f.label_selector):
                continue
        yield pod


def _find_by_prefix(rt: Runtime, prefix: str) -> PodRecord | None:
    try:
        return rt.pods.get(prefix)
    except CriError:  # unknown or ambiguous: the filter matches nothing
        return None


async def list_pod_sandbox(rt: Runtime, request: cri.ListPodSandboxRequest) -> bytes:
    """The encoded ListPodSandboxResponse, assembled from each pod's cached encoding."""
    if not request.HasField("filter") or request.filter.ByteSize() == 0:
        return rt.pods.all_list_bytes(lambda p: p.state != PodState.INIT)
    return b"".join(rt.pods.list_item_bytes(pod) for pod in _matching(rt, request.filter))


async def stream_pod_sandboxes(
    rt: Runtime, request: cri.StreamPodSandboxesRequest
) -> AsyncIterator[bytes]:
    f = request.filter if request.HasField("filter") else None
    pods = list(_matching(rt, f))
    for start in range(0, len(pods), STREAM_CHUNK):
        yield b"".join(rt.pods.list_item_bytes(p) for p in pods[start:start + STREAM_CHUNK])
