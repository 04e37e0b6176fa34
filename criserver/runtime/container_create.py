"""CreateContainer: reserve the name, persist, let the backend create it, undo on failure."""

from __future__ import annotations

import logging
import os
import time

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.runtime import validate
from criserver.runtime.runtime import Runtime
from criserver.runtime.sandbox_run import new_id
from criserver.runtime.undo import UndoStack
from criserver.store.records import ContainerRecord, PodRecord, PodState

log = logging.getLogger(__name__)


async def create_container(
    rt: Runtime, request: cri.CreateContainerRequest
) -> cri.CreateContainerResponse:
    validate.container_config(request.config)
    pod = rt.pods.get(request.pod_sandbox_id)
    container_id = new_id()
    # Its own lock too: a RemoveContainer of the record listed while it is made waits.
    async with rt.container_call(pod.id, container_id):
        pod = rt.pods.get(pod.id)
        if pod.state != PodState.READY:
            raise FailedPrecondition(f"pod sandbox {pod.id} is not ready")
        container = ContainerRecord(
            id=container_id, pod_id=pod.id, config=request.config, created_at=time.time_ns(),
            log_path=_log_path(pod, request.config),
        )
        name = container.name_key(pod)
        rt.containers.names.reserve(name, container.id)
        try:
            await rt.transitions.add_container(container)
            container = await _create(rt, pod, container)
        except BaseException:
            if rt.containers.find(container.id) is None:
                rt.containers.names.release(name, container.id)
            raise
    log.info("container created container=%s pod=%s name=%s", container.id, pod.id, name)
    return cri.CreateContainerResponse(container_id=container.id)


async def _create(rt: Runtime, pod: PodRecord, container: ContainerRecord) -> ContainerRecord:
    undo = UndoStack(f"container {container.id}")
    try:
        created = await rt.backend(pod).create_container(pod, container, undo)
        return await rt.transitions.container_created(container.id, created)
    except BaseException as exc:
        log.warning("create container failed container=%s pod=%s error=%r",
                    container.id, pod.id, exc)
        failed = await undo.rollback()
        error = str(exc)
        if failed:
            await rt.transitions.container_create_failed(
                container.id, f"{error}; cleanup incomplete: {', '.join(failed)}")
        else:
            await rt.transitions.drop_container(container.id)
        raise


def _log_path(pod: PodRecord, config: cri.ContainerConfig) -> str:
    if not config.log_path:
        return ""
    if not pod.config.log_directory:
        raise InvalidArgument("container log_path is set but the pod has no log_directory")
    base = os.path.normpath(pod.config.log_directory)
    path = os.path.normpath(os.path.join(base, config.log_path))
    # commonpath, not a prefix test: a log directory of "/" holds "/x.log" too.
    if path == base or os.path.commonpath([base, path]) != base:
        raise InvalidArgument(f"container log_path {config.log_path!r} leaves the log directory")
    return path
