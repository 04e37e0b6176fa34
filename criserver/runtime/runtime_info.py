"""Version, Status, RuntimeConfig and UpdateRuntimeConfig."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform

import criserver
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import InvalidArgument
from criserver.runtime.runtime import Runtime, info_json

RUNTIME_NAME = "criserver"
RUNTIME_API_VERSION = "v1"
POD_CIDR_SETTING = "pod_cidr"


async def version(rt: Runtime, request: cri.VersionRequest) -> cri.VersionResponse:
    return cri.VersionResponse(
        version="0.1.0",  # the CRI's own kubelet-facing API version field
        runtime_name=RUNTIME_NAME,
        runtime_version=criserver.__version__,
        runtime_api_version=RUNTIME_API_VERSION,
    )


async def status(rt: Runtime, request: cri.StatusRequest) -> cri.StatusResponse:
    default = rt.config.runtime.default_handler
    # Every configured handler counts: a pod may name any of them (as containerd, whose
    # NetworkReady is false when any handler's network is not).
    handlers = [default, *sorted(set(rt.backends) - {default})]
    statuses = dict(zip(handlers, await asyncio.gather(
        *(rt.backends[name].status() for name in handlers)), strict=True))
    conditions = [
        _condition("RuntimeReady", {name: (s.runtime_ready, s.runtime_reason, s.runtime_message)
                                    for name, s in statuses.items()}),
        _condition("NetworkReady", {name: (s.network_ready, s.network_reason, s.network_message)
                                    for name, s in statuses.items()}),
    ]
    response = cri.StatusResponse(
        status=cri.RuntimeStatus(conditions=conditions),
        # Strict and Merge are told apart where users are resolved (vmagent/users.py).
        features=cri.RuntimeFeatures(supplemental_groups_policy=True),
    )
    # The default handler under the empty name (what a pod naming no handler gets), then
    # every configured handler under its own name, the default's included.
    for label, name in [("", default), *((name, name) for name in sorted(rt.backends))]:
        features = rt.backends[name].features
        response.runtime_handlers.append(cri.RuntimeHandler(
            name=label,
            features=cri.RuntimeHandlerFeatures(
                recursive_read_only_mounts=features.recursive_read_only_mounts,
                user_namespaces=features.user_namespaces),
        ))
    if request.verbose:
        response.info["config"] = info_json(rt.config.as_dict())
        response.info["host"] = info_json({
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "pod_cidr": rt.settings.get(POD_CIDR_SETTING, ""),
            "event_subscribers": rt.events.subscriber_count,
        })
        facts = await asyncio.to_thread(_process_facts)
        response.info["daemon"] = info_json({**facts, "asyncioTasks": len(asyncio.all_tasks())})
        for name, backend_status in sorted(statuses.items()):
            response.info[f"runtime.{name}"] = info_json(backend_status.info)
    return response


def _process_facts() -> dict[str, int]:
    """The daemon's own footprint, for operators and the churn tests: what must come back to
    its baseline once pods are gone (blocking reads of /proc: call in a thread)."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return {
        "pid": os.getpid(),
        "rssBytes": rss_pages * page,
        "openFds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
    }


def _condition(kind: str, by_handler: dict[str, tuple[bool, str, str]]) -> cri.RuntimeCondition:
    """`kind` holds when it holds for every handler; otherwise the reason is the first
    failing handler's (the default's first) and the message names each failing handler."""
    failing = [(name, reason, message) for name, (ready, reason, message) in by_handler.items()
               if not ready]
    if not failing:
        return cri.RuntimeCondition(type=kind, status=True)
    return cri.RuntimeCondition(
        type=kind, status=False, reason=failing[0][1],
        message="; ".join(f"runtime handler {name!r}: {message or reason}"
                          for name, reason, message in failing))


async def runtime_config(
    rt: Runtime, request: cri.RuntimeConfigRequest
) -> cri.RuntimeConfigResponse:
    driver = cri.SYSTEMD if rt.config.daemon.cgroup_driver == "systemd" else cri.CGROUPFS
    return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))


async def update_runtime_config(
    rt: Runtime, request: cri.UpdateRuntimeConfigRequest
) -> cri.UpdateRuntimeConfigResponse:
    cidr = request.runtime_config.network_config.pod_cidr
    for part in filter(None, cidr.split(",")):
        try:
            ipaddress.ip_network(part.strip())
        except ValueError as exc:
            raise InvalidArgument(f"pod_cidr {cidr!r}: {exc}") from exc
    if cidr and cidr != rt.settings.get(POD_CIDR_SETTING):
        # Kept for the network layer, which reads it when it (re)builds its default network.
        await rt.save_setting(POD_CIDR_SETTING, cidr)
        for backend in rt.backends.values():
            await backend.set_pod_cidr(cidr)
    return cri.UpdateRuntimeConfigResponse()
