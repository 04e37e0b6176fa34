"""ContainerStats, ListContainerStats, PodSandboxStats and ListPodSandboxStats."""

from __future__ import annotations

from collections.abc import AsyncIterator

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import CriError
from criserver.runtime.filters import check_label_selector, labels_match
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerRecord, ContainerState, PodState


async def container_stats(
    rt: Runtime, request: cri.ContainerStatsRequest
) -> cri.ContainerStatsResponse:
    container = rt.containers.get(request.container_id)
    pod = rt.pods.get(container.pod_id)
    return cri.ContainerStatsResponse(stats=await rt.backend(pod).container_stats(pod, container))


async def list_container_stats(
    rt: Runtime, request: cri.ListContainerStatsRequest
) -> cri.ListContainerStatsResponse:
    f = request.filter
    check_label_selector(f.label_selector)
    by_pod: dict[str, list[ContainerRecord]] = {}
    for container in list(rt.containers.all()):
        if container.state != ContainerState.RUNNING:
            continue
        if f.id and not container.id.startswith(f.id):
            continue
        if f.pod_sandbox_id and not container.pod_id.startswith(f.pod_sandbox_id):
            continue
        if not labels_match(container.config.labels, f.label_selector):
            continue
        by_pod.setdefault(container.pod_id, []).append(container)
    response = cri.ListContainerStatsResponse()
    for pod_id, containers in by_pod.items():
        pod = rt.pods.find(pod_id)
        if pod is None:
            continue
        try:
            # One backend call per pod: the micro-VM backend asks its agent once for them all.
            response.stats.extend(await rt.backend(pod).containers_stats(pod, containers))
        except CriError:
            continue  # the pod stopped meanwhile, or its backend has no stats: leave it out
    return response


async def pod_sandbox_stats(
    rt: Runtime, request: cri.PodSandboxStatsRequest
) -> cri.PodSandboxStatsResponse:
    pod = rt.pods.get(request.pod_sandbox_id)
    return cri.PodSandboxStatsResponse(stats=await rt.backend(pod).sandbox_stats(pod))


async def list_pod_sandbox_stats(
    rt: Runtime, request: cri.ListPodSandboxStatsRequest
) -> cri.ListPodSandboxStatsResponse:
    f = request.filter
    check_label_selector(f.label_selector)
    response = cri.ListPodSandboxStatsResponse()
    for pod in list(rt.pods.all()):
        if pod.state != PodState.READY:
            continue
        if f.id and not pod.id.startswith(f.id):
            continue
        if not labels_match(pod.config.labels, f.label_selector):
            continue
        try:
            response.stats.append(await rt.backend(pod).sandbox_stats(pod))
        except CriError:
            continue
    return response


async def stream_container_stats(
    rt: Runtime, request: cri.StreamContainerStatsRequest
) -> AsyncIterator[cri.StreamContainerStatsResponse]:
    listed = await list_container_stats(rt, cri.ListContainerStatsRequest(filter=request.filter))
    if listed.stats:
        yield cri.StreamContainerStatsResponse(container_stats=listed.stats)


async def stream_pod_sandbox_stats(
    rt: Runtime, request: cri.StreamPodSandboxStatsRequest
) -> AsyncIterator[cri.StreamPodSandboxStatsResponse]:
    listed = await list_pod_sandbox_stats(rt, cri.ListPodSandboxStatsRequest(filter=request.filter))
    if listed.stats:
        yield cri.StreamPodSandboxStatsResponse(pod_sandbox_stats=listed.stats)
