"""ContainerStats, ListContainerStats, PodSandboxStats and ListPodSandboxStats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime.filters import check_label_selector, labels_match
from criserver.runtime.runtime import Runtime
from criserver.store.records import ContainerRecord, ContainerState, PodState

# In a list, each pod's stats may take this long: a pod whose guest does not answer is left
# out (and logged) instead of holding up every other pod's (kubelet lists them all every
# few seconds, and a wedged guest would otherwise fail its whole call); later lists leave it
# out at once and ask it in the background until it answers (criserver/runtime/stragglers.py).
LIST_POD_TIMEOUT = 5.0


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
    # One backend call per pod: the micro-VM backend asks its agent once for them all.
    calls = {pod.id: partial(rt.backend(pod).containers_stats, pod, containers)
             for pod_id, containers in by_pod.items() if (pod := rt.pods.find(pod_id))}
    response = cri.ListContainerStatsResponse()
    for stats in (await rt.stats_stragglers.each(calls, LIST_POD_TIMEOUT)).values():
        response.stats.extend(stats)
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
    calls = {pod.id: partial(rt.backend(pod).sandbox_stats, pod) for pod in list(rt.pods.all())
             if pod.state == PodState.READY and pod.id.startswith(f.id)
             and labels_match(pod.config.labels, f.label_selector)}
    answers = await rt.stats_stragglers.each(calls, LIST_POD_TIMEOUT)
    return cri.ListPodSandboxStatsResponse(stats=list(answers.values()))


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
