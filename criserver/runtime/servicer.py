"""The RuntimeService table: each CRI call handed to the module named after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime import (
    container_create,
    container_exec,
    container_remove,
    container_start,
    container_stats,
    container_status,
    container_stop,
    container_update,
    metrics,
    runtime_info,
    sandbox_remove,
    sandbox_run,
    sandbox_status,
    sandbox_stop,
)
from criserver.runtime.runtime import Runtime
from criserver.runtime.streaming import rpc as streaming

# Why each unimplemented call is: the caller sees this in the UNIMPLEMENTED status.
MISSING = {
    "CheckpointContainer": "checkpoint/restore of containers is not supported",
    "UpdatePodSandboxResources": "resizing a running pod's VM is not supported yet",
}


def runtime_service(rt: Runtime) -> dict[str, Any]:
    def bind(fn: Any) -> Any:
        return partial(fn, rt)

    return {
        "Version": bind(runtime_info.version),
        "Status": bind(runtime_info.status),
        "RuntimeConfig": bind(runtime_info.runtime_config),
        "UpdateRuntimeConfig": bind(runtime_info.update_runtime_config),
        "RunPodSandbox": bind(sandbox_run.run_pod_sandbox),
        "StopPodSandbox": bind(sandbox_stop.stop_pod_sandbox),
        "RemovePodSandbox": bind(sandbox_remove.remove_pod_sandbox),
        "PodSandboxStatus": bind(sandbox_status.pod_sandbox_status),
        "ListPodSandbox": bind(sandbox_status.list_pod_sandbox),
        "StreamPodSandboxes": bind(sandbox_status.stream_pod_sandboxes),
        "CreateContainer": bind(container_create.create_container),
        "StartContainer": bind(container_start.start_container),
        "StopContainer": bind(container_stop.stop_container),
        "RemoveContainer": bind(container_remove.remove_container),
        "ContainerStatus": bind(container_status.container_status),
        "ListContainers": bind(container_status.list_containers),
        "StreamContainers": bind(container_status.stream_containers),
        "UpdateContainerResources": bind(container_update.update_container_resources),
        "ReopenContainerLog": bind(container_update.reopen_container_log),
        "ExecSync": bind(container_exec.exec_sync),
        "ContainerStats": bind(container_stats.container_stats),
        "ListContainerStats": bind(container_stats.list_container_stats),
        "StreamContainerStats": bind(container_stats.stream_container_stats),
        "PodSandboxStats": bind(container_stats.pod_sandbox_stats),
        "ListPodSandboxStats": bind(container_stats.list_pod_sandbox_stats),
        "StreamPodSandboxStats": bind(container_stats.stream_pod_sandbox_stats),
        "GetContainerEvents": partial(_events, rt),
        "ListMetricDescriptors": bind(metrics.list_metric_descriptors),
        "ListPodSandboxMetrics": bind(metrics.list_pod_sandbox_metrics),
        "StreamPodSandboxMetrics": bind(metrics.stream_pod_sandbox_metrics),
        "Exec": bind(streaming.exec_),
        "Attach": bind(streaming.attach),
        "PortForward": bind(streaming.port_forward),
    }


async def _events(
    rt: Runtime, request: cri.GetEventsRequest
) -> AsyncIterator[cri.ContainerEventResponse]:
    async for event in rt.events.subscribe():
        yield event
