"""RunPodSandbox: reserve the name, persist the pod, let the backend start it, undo on failure."""

from __future__ import annotations

import logging
import secrets
import time

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.runtime import validate
from criserver.runtime.runtime import Runtime
from criserver.runtime.undo import UndoStack
from criserver.store.records import PodRecord
from criserver.trace import timed_entry

log = logging.getLogger(__name__)


def new_id() -> str:
    return secrets.token_hex(32)


async def run_pod_sandbox(
    rt: Runtime, request: cri.RunPodSandboxRequest
) -> cri.RunPodSandboxResponse:
    validate.pod_config(request.config)
    chosen = rt.handler_for(request.runtime_handler, request.config)
    handler = chosen.handler
    pod = PodRecord(id=new_id(), config=request.config, runtime_handler=handler,
                    routed_by=chosen.reason, created_at=time.time_ns())
    rt.pods.names.reserve(pod.name_key, pod.id)
    try:
        async with timed_entry("lock", rt.pod_locks.exclusive(pod.id)):
            # Persisted before anything starts, so a daemon that dies half-way finds the INIT
            # record at start-up and cleans up after it.
            await rt.transitions.add_pod(pod)
            pod = await _start(rt, pod)
    except BaseException:
        if rt.pods.find(pod.id) is None:
            rt.pods.names.release(pod.name_key, pod.id)
        raise
    log.info("pod ready pod=%s name=%s handler=%s", pod.id, pod.name_key, handler)
    return cri.RunPodSandboxResponse(pod_sandbox_id=pod.id)


async def _start(rt: Runtime, pod: PodRecord) -> PodRecord:
    undo = UndoStack(f"pod {pod.id}")
    try:
        started = await rt.backend(pod).run_sandbox(pod, undo)
        return await rt.transitions.pod_ready(pod.id, started)
    except BaseException as exc:
        log.warning("run pod failed pod=%s name=%s error=%r", pod.id, pod.name_key, exc)
        failed = await undo.rollback()
        error = str(exc)
        if failed:
            # Something may be left behind: keep the pod (NOTREADY) so RemovePodSandbox can
            # retry the cleanup, rather than forgetting resources we can no longer find.
            await rt.transitions.pod_setup_failed(
                pod.id, f"{error}; cleanup incomplete: {', '.join(failed)}")
        else:
            await rt.transitions.drop_pod(pod.id)
        raise
