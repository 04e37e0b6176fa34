"""The runc backend: trusted pods (the node's namespaces, Bidirectional mounts) on the host.

A pod is a set of pinned namespaces (network through the daemon's PodNetwork, IPC and UTS by
bind mount), its files and its /dev/shm; there is no infra process. Each container is a runc
container whose parent is its own `ctrmon` (monitor.py): ctrmon holds the container's stdio,
writes its CRI log and records its exit, so the daemon can die and come back without losing a
byte or an exit code. Root filesystems are the images' EROFS files under an overlay (rootfs.py).
docs/design/runc-backend.md explains each choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from grpclib.exceptions import GRPCError

from criserver import files
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.net_usage import interface_samples, network_usage
from criserver.backends.runc import cgroups, infra, monitor, rootfs, streams
from criserver.backends.runc.runc import Runc, find_runc
from criserver.backends.runc.spec_policy import host_policy
from criserver.config import build_options, option
from criserver.errors import (
    CriError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from criserver.failpoints import crash_point
from criserver.network import netns
from criserver.network.cni import PortMapping
from criserver.network.pod import PodNetwork, daemon_network
from criserver.runtime import exit_codes, oci_spec, pod_files, validate
from criserver.runtime.backend import (
    BackendContext,
    BackendFeatures,
    BackendStatus,
    BaseBackend,
    ContainerCreated,
    ExecResult,
    SandboxStarted,
)
from criserver.runtime.metric_sample import PodSample
from criserver.runtime.streaming.interface import ByteSink, ByteSource, ResizeSource
from criserver.runtime.undo import UndoStack
from criserver.store.records import ContainerRecord, ContainerState, PodRecord, PodState
from vmagent.api import agent_pb2 as pb
from vmagent.cgroups import exit_reason
from vmagent.metrics import interfaces
from vmagent.ocispec import guest_devices, set_process_user
from vmagent.users import resolve_in_rootfs

log = logging.getLogger(__name__)
A = TypeVar("A")
B = TypeVar("B")

MAX_EXEC_OUTPUT = 16 * 1024 * 1024
LAYER_SIZE_TTL = 5.0  # seconds a writable layer's measured size is reused
SHM_SIZE = "64m"  # the pod's /dev/shm, as Docker's and containerd's default
PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp", cri.SCTP: "sctp"}


@dataclass(frozen=True)
class RuncOptions:
    """`[runtimes.<handler>.options]` of a runc handler."""

    runc: str = option("", "runc executable, a path or a name on PATH; empty: /usr/sbin/runc, "
                           "/usr/bin/runc or PATH")
    monitor: str = option(monitor.DEFAULT_CTRMON, "ctrmon, the per-container monitor "
                                                  "(built by make ctrmon)")
    network: bool = option(True, "Give pods that do not share the node's network a CNI network "
                                 "(false: a netns with loopback only)")
    stop_grace: float = option(10.0, "Seconds a container killed with SIGKILL has to be gone",
                               min=0)


@dataclass
class _Watched:
    """A container whose monitor the daemon follows."""

    pod_id: str
    record: ContainerRecord  # as created: its `backend` is not filled in yet
    cgroup: str
    monitor: monitor.Monitor
    task: asyncio.Task[None]
    exited: asyncio.Event


class RuncBackend(BaseBackend):
    name = "runc"
    features = BackendFeatures(recursive_read_only_mounts=True, streaming=True)

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None:
        super().__init__(options, context)
        self.settings: RuncOptions = build_options(
            RuncOptions, options, f"runtimes.{context.handler}.options")
        if context.config.daemon.cgroup_driver != "cgroupfs":
            raise InvalidArgument(
                f"runtimes.{context.handler}: the runc backend supports daemon.cgroup_driver "
                f"\"cgroupfs\" only, not {context.config.daemon.cgroup_driver!r}")
        self.network: PodNetwork = context.shared.get(
            PodNetwork, lambda: daemon_network(context.config))
        self.runc = Runc(find_runc(self.settings.runc) or self.settings.runc or "runc",
                         context.state / "runc")
        self.policy = host_policy()
        self.images = rootfs.ImageMounts(context.state / "mounts" / "images")
        self.cgroup_version = cgroups.cgroup_version()
        # kubelet sends a limit (0) per page size for every container; without the controller
        # they are dropped, as CRI-O (CgroupHasHugetlb) and containerd (disable_hugetlb_controller)
        self._hugetlb = cgroups.has_hugetlb(self.cgroup_version)
        self._watched: dict[str, _Watched] = {}
        self._specs: dict[str, dict[str, Any]] = {}  # container id -> its config.json
        self._infra: dict[str, monitor.Monitor] = {}  # pod id -> its infra container
        # Pods this daemon stopped completely (containers, infra, network), until removed.
        self._stopped: set[str] = set()
        self._nano_cores = cgroups.NanoCores()
        self._layer_sizes: dict[str, tuple[float, int]] = {}  # container id -> (when, bytes)
        self._monitor_version = ""
        self._monitor_error = ""

    # -- where things are ------------------------------------------------------------------

    def _pod_dir(self, pod_id: str) -> Path:
        """The pod's files (hostname, hosts, resolv.conf) and its /dev/shm."""
        return self.context.state / "pods" / pod_id[:16]

    def _ns_pin(self, pod_id: str, kind: str) -> Path:
        return self.context.state / "ns" / f"{pod_id[:16]}-{kind}"

    def _bundle(self, container_id: str) -> Path:
        # Short: ctrmon's control socket in it must fit AF_UNIX's 107 bytes.
        return self.context.state / "c" / container_id[:16]

    def _rootfs_mounts(self) -> Path:
        return self.context.state / "mounts" / "rootfs"

    def _rootfs_mount(self, container_id: str) -> Path:
        return self._rootfs_mounts() / container_id[:16]

    def _layer_dir(self, container_id: str) -> Path:
        """The container's writable layer (upper and work): on disk, it survives restarts."""
        return self.context.root / "containers" / container_id

    # -- daemon life -----------------------------------------------------------------------

    async def start(self, pods: list[PodRecord], containers: list[ContainerRecord]) -> None:
        await self._check_monitor()
        # Our unmounts must reach mount namespaces copied meanwhile (a copy would pin them).
        await rootfs.share_directory(self._rootfs_mounts())
        users: Counter[str] = Counter()
        for container in containers:
            for key in container.backend.get("imageMounts", ()):
                users[key] += 1
        await self.images.recover(users)
        pods_by_id = {p.id: p for p in pods}
        for container in containers:
            if container.state in (ContainerState.CREATED, ContainerState.RUNNING,
                                   ContainerState.UNKNOWN) and container.pod_id in pods_by_id:
                await self._recover(container)

    async def _recover(self, container: ContainerRecord) -> None:
        bundle = self._bundle(container.id)
        # Exec sessions the dead daemon ran: their files (the processes died with runc's parent
        # or run on unattended; nobody reads their output any more).
        for leftover in await asyncio.to_thread(lambda: list(bundle.glob("exec-*"))):
            await asyncio.to_thread(leftover.unlink, True)
        adopted = await asyncio.to_thread(monitor.Monitor.adopt, bundle)
        if adopted is not None:
            if container.state == ContainerState.CREATED:
                await self._started_while_down(container, adopted.container_pid)
            self._follow(container, adopted, str(container.backend.get("cgroup", "")))
            log.info("container adopted container=%s monitor_pid=%s", container.id, adopted.pid)
            return
        record = await asyncio.to_thread(monitor.read_exit, bundle)
        if record is not None:
            await self._report_exit(container, record, str(container.backend.get("cgroup", "")),
                                    gone=False)
            return
        # Neither a monitor nor its exit record: the monitor was killed, or the host rebooted.
        await self.runc.delete(container.id)
        log.warning("container lost container=%s: its monitor is gone", container.id)
        await self.context.events.container_exited(
            container.id, exit_codes.LOST, exit_codes.ERROR,
            "the container's monitor died or the host restarted", time.time_ns())

    async def _started_while_down(self, container: ContainerRecord, pid: int) -> None:
        """A container recorded CREATED whose runc container runs: a daemon died inside
        StartContainer after `runc start`. runc is the truth: record it RUNNING (from when its
        process began), rather than list it CREATED while it runs and refuse to start it."""
        state = await self.runc.state(container.id)
        if state is None or state.get("status") not in ("running", "paused", "stopped"):
            return
        log.warning("container started by a daemon that died before recording it, running "
                    "container=%s", container.id)
        started = await asyncio.to_thread(_process_start_ns, pid)
        await self.context.events.container_started(container.id, started or time.time_ns())

    async def _check_monitor(self) -> None:
        try:
            self._monitor_version = await monitor.check_ctrmon(self.settings.monitor)
            self._monitor_error = ""
        except CriError as exc:
            self._monitor_error = exc.message
            log.error("runc backend not ready handler=%s: %s", self.context.handler, exc.message)

    async def close(self) -> None:
        # The containers and their monitors keep running; only the watchers stop.
        for watched in self._watched.values():
            watched.task.cancel()
        for watched in list(self._watched.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await watched.task
            watched.monitor.close()
        self._watched.clear()

    async def status(self) -> BackendStatus:
        if not self._monitor_version:
            await self._check_monitor()
        runc_path = find_runc(self.settings.runc)
        problems = [p for p in (
            "" if runc_path else f"runc not found ({self.settings.runc or 'runc'}): "
                                 "apt-get install runc",
            self._monitor_error) if p]
        network = await self.network.status() if self.settings.network else None
        return BackendStatus(
            runtime_ready=not problems,
            runtime_reason="" if not problems else "RuncBackendNotReady",
            runtime_message="; ".join(problems),
            network_ready=network.ready if network else True,
            network_reason=network.reason if network else "",
            network_message=network.message if network else "",
            info={"backend": self.name, "runc": runc_path, "monitor": self.settings.monitor,
                  "monitorVersion": self._monitor_version,
                  "cgroupVersion": self.cgroup_version,
                  "containers": len(self._watched)})

    async def set_pod_cidr(self, cidr: str) -> None:
        await self.network.set_pod_cidr(cidr)

    # -- sandboxes -------------------------------------------------------------------------

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        config = pod.config
        ns = config.linux.security_context.namespace_options
        if validate.user_namespace(ns):
            raise InvalidArgument("the runc handler has no user namespaces (runc 1.1 cannot "
                                  "id-map mounts); run the pod with hostUsers: true")
        host_network = ns.network == cri.NODE
        pod_dir = self._pod_dir(pod.id)
        await asyncio.to_thread(pod_dir.mkdir, parents=True, exist_ok=True)
        undo.push("remove pod dir", lambda: asyncio.to_thread(shutil.rmtree, pod_dir, True))
        backend: dict[str, Any] = {"podDir": str(pod_dir)}
        if not host_network:
            netns_path = await self.network.prepare(pod.id)
            undo.push("tear down network", lambda: self.network.teardown(pod.id))
            backend["netns"] = str(netns_path)
            uts = self._ns_pin(pod.id, "uts")
            await netns.pin(uts, "uts", hostname=pod_files.pod_hostname(config))
            undo.push("unpin uts", lambda: netns.remove(uts))
            backend["uts"] = str(uts)
        if ns.ipc != cri.NODE:
            ipc = self._ns_pin(pod.id, "ipc")
            await netns.pin(ipc, "ipc")
            undo.push("unpin ipc", lambda: netns.remove(ipc))
            backend["ipc"] = str(ipc)
            shm = pod_dir / "shm"
            await rootfs.mount_tmpfs(shm, f"nosuid,nodev,noexec,mode=1777,size={SHM_SIZE}")
            undo.push("unmount shm", lambda: rootfs.unmount(shm))
        crash_point("runc_run_sandbox.namespaces")  # netns, pins, /dev/shm; no CNI, no infra
        # CNI ADD and the infra container are independent (the infra joins the netns whatever
        # is in it): both at once, which is most of a pod's start.
        ips, infra_monitor = await _together(
            self._connect(pod) if not host_network and self.settings.network else None,
            self._start_infra(pod, backend, undo) if ns.pid != cri.NODE else None)
        if infra_monitor is not None:
            backend["infraPid"] = infra_monitor.container_pid
        await asyncio.to_thread(_write_pod_files, pod_dir, config, ips or (), host_network)
        crash_point("runc_run_sandbox.set_up")  # all made, the pod still INIT
        log.info("pod ready on the host pod=%s handler=%s host_network=%s host_pid=%s "
                 "host_ipc=%s ips=%s", pod.id, self.context.handler, host_network,
                 ns.pid == cri.NODE, ns.ipc == cri.NODE, list(ips or ()))
        return SandboxStarted(ips=ips or (), backend=backend)

    async def _connect(self, pod: PodRecord) -> tuple[str, ...]:
        """CNI ADD in the pod's netns (prepared): the pod's IPs."""
        meta = pod.config.metadata
        attachment = await self.network.connect(
            pod.id, meta.name, meta.namespace, meta.uid,
            [PortMapping(host_port=p.host_port, container_port=p.container_port,
                         protocol=PROTOCOLS.get(p.protocol, "tcp"), host_ip=p.host_ip)
             for p in pod.config.port_mappings if p.host_port > 0])
        return tuple(attachment.ips)

    def _infra_bundle(self, pod_id: str) -> Path:
        return self.context.state / "infra" / pod_id[:16]

    async def _start_infra(self, pod: PodRecord, namespaces: dict[str, Any],
                           undo: UndoStack) -> monitor.Monitor:
        """The pod's infra container (infra.py), started: the holder of its PID namespace."""
        bundle = self._infra_bundle(pod.id)
        root = bundle / "rootfs"
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        undo.push("remove infra bundle", lambda: asyncio.to_thread(shutil.rmtree, bundle, True))
        joined = {kind: str(namespaces[key]) for kind, key in
                  (("network", "netns"), ("ipc", "ipc"), ("uts", "uts")) if key in namespaces}
        parent = pod.config.linux.cgroup_parent or f"/criserver/{pod.id}"
        spec = infra.infra_spec(monitor_binary=self.settings.monitor, rootfs=root,
                                cgroups_path=f"{parent.rstrip('/')}/{pod.id}",
                                namespaces=joined)
        await asyncio.to_thread(_write_bundle, bundle, spec)
        runc_id = _infra_id(pod.id)
        started = await monitor.launch(
            self.settings.monitor, runc=self.runc.binary, runc_root=self.runc.root,
            bundle=bundle, container_id=runc_id, log_path=str(bundle / "infra.log"))
        undo.push("delete infra container", lambda: self.runc.delete(runc_id))
        crash_point("runc_run_sandbox.infra_created")  # its monitor up, runc created, not started
        await self.runc.start(runc_id)
        self._infra[pod.id] = started
        return started

    async def _infra_pid(self, pod: PodRecord) -> int:
        """PID 1 of the pod's PID namespace, checked alive (its monitor still watches it)."""
        infra_monitor = self._infra.get(pod.id)
        if infra_monitor is None:
            infra_monitor = await asyncio.to_thread(monitor.Monitor.adopt,
                                                    self._infra_bundle(pod.id))
            if infra_monitor is None:
                raise FailedPrecondition(f"pod {pod.id}: its infra process is gone; the pod's "
                                         "PID namespace cannot be joined")
            self._infra[pod.id] = infra_monitor
        return infra_monitor.container_pid

    def _made_for(self, pod: PodRecord) -> dict[str, Any]:
        """What run_sandbox made for the pod, as it recorded it. A pod still INIT (the daemon
        died in its RunPodSandbox; start-up recovery removes it) has nothing recorded: then
        everything its config could have made is looked for (each removal is idempotent)."""
        if pod.backend or pod.state != PodState.INIT:
            return pod.backend
        ns = pod.config.linux.security_context.namespace_options
        made: dict[str, Any] = {}
        if ns.network != cri.NODE:
            made["netns"] = str(self.network.netns_path(pod.id))
        if ns.pid != cri.NODE:
            made["infraPid"] = 0
        return made

    async def stop_sandbox(self, pod: PodRecord) -> None:
        if pod.id in self._stopped:
            return  # RemovePodSandbox stops again what StopPodSandbox stopped: nothing is left
        made = self._made_for(pod)
        # kubelet stops the containers first with their grace periods; what still runs dies.
        for cid, watched in list(self._watched.items()):
            if watched.pod_id == pod.id:
                await self._kill(cid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watched.exited.wait(), self.settings.stop_grace)
        if "infraPid" in made:
            # Killed and waited for through its monitor, then deleted: `runc delete --force`
            # of a running container sleeps a fixed 100 ms after its SIGKILL (runc 1.1).
            await self._kill(_infra_id(pod.id), signal.SIGKILL)
            infra_monitor = self._infra.pop(pod.id, None) or await asyncio.to_thread(
                monitor.Monitor.adopt, self._infra_bundle(pod.id))
            if infra_monitor is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(infra_monitor.wait(), self.settings.stop_grace)
                infra_monitor.close()
            await self.runc.delete(_infra_id(pod.id))
        if "netns" in made:
            await self.network.teardown(pod.id)  # after the containers: they pin the netns
        self._stopped.add(pod.id)
        log.info("pod stopped pod=%s", pod.id)

    async def remove_sandbox(self, pod: PodRecord) -> None:
        await self.stop_sandbox(pod)
        crash_point("runc_remove_sandbox.stopped")  # all stopped, files and record there
        self._stopped.discard(pod.id)
        for kind in ("uts", "ipc"):
            await netns.remove(self._ns_pin(pod.id, kind))
        pod_dir = self._pod_dir(pod.id)
        await rootfs.unmount(pod_dir / "shm")
        await asyncio.to_thread(shutil.rmtree, pod_dir, True)
        await asyncio.to_thread(shutil.rmtree, self._infra_bundle(pod.id), True)
        self._nano_cores.forget(pod.id)
        if not pod.config.linux.cgroup_parent:
            # The default parent is ours (a kubelet-given one is kubelet's).
            await asyncio.to_thread(cgroups.remove_pod_cgroup, f"/criserver/{pod.id}",
                                    self.cgroup_version)
        crash_point("runc_remove_sandbox.files")  # nothing of the pod left but its record

    async def sandbox_info(self, pod: PodRecord) -> dict[str, Any]:
        return {"backend": self.name, **pod.backend}

    # -- containers ------------------------------------------------------------------------

    async def create_container(
        self, pod: PodRecord, container: ContainerRecord, undo: UndoStack
    ) -> ContainerCreated:
        if pod.state != PodState.READY:
            raise FailedPrecondition(f"pod {pod.id} is not ready")
        images = self.context.images
        if images is None:
            raise FailedPrecondition("the runc backend needs the image service")
        config = container.config
        image = images.get(config.image.image)
        if image is None:
            raise NotFound(f"image {config.image.image!r} is not present: pull it first")
        keys: list[str] = []

        async def mount_image(image_id: str) -> Path:
            key = image_id.removeprefix("sha256:")
            path = await self.images.acquire(key, images.snapshot_path(image_id))
            keys.append(key)
            undo.push("release image", lambda: self.images.release(key))
            return path

        lower = await mount_image(image.id)
        volume_images: dict[str, str] = {}
        image_volumes: dict[str, str] = {}
        for m in config.mounts:
            if m.image.image:
                mounted = images.get(m.image.image)
                if mounted is None:
                    raise NotFound(f"image {m.image.image!r} of the image volume at "
                                   f"{m.container_path} is not present: pull it first")
                source = await mount_image(mounted.id)
                volume_images[m.container_path] = mounted.id
                image_volumes[m.container_path] = str(_sub_path(source, m.image_sub_path))
        layer = self._layer_dir(container.id)
        target = self._rootfs_mount(container.id)
        await rootfs.mount_container_rootfs(lower, layer / "upper", layer / "work", target)
        undo.push("unmount rootfs", lambda: rootfs.unmount(target))
        undo.push("remove writable layer", lambda: rootfs.remove_tree(layer))
        crash_point("runc_create_container.rootfs")  # image and overlay mounted, no bundle

        ns = pod.backend
        pid_ns = None
        container_ns = config.linux.security_context.namespace_options
        if container_ns.pid == cri.POD:
            if "infraPid" in ns:
                pid_ns = f"/proc/{await self._infra_pid(pod)}/ns/pid"
            else:
                # The pod is in the node's PID namespace: so is what shares the pod's.
                config = _with_pid_mode(config, cri.NODE)
        generated = await oci_spec.generate_async(
            config, pod.config, oci_spec.ImageConfigView.from_dict(image.config),
            oci_spec.PodNamespaces(ipc=ns.get("ipc", ""), uts=ns.get("uts", ""),
                                   net=ns.get("netns"), pid=pid_ns),
            lambda m: m.host_path, policy=self.policy, container_id=container.id,
            sandbox_id=pod.id, image_name=config.image.image, sandbox_dir=ns["podDir"],
            image_volumes=image_volumes)
        spec = await asyncio.to_thread(_host_spec, generated, target)
        if not self._hugetlb:
            spec["linux"].get("resources", {}).pop("hugepageLimits", None)
        bundle = self._bundle(container.id)
        await asyncio.to_thread(_write_bundle, bundle, spec)
        undo.push("remove bundle", lambda: asyncio.to_thread(shutil.rmtree, bundle, True))
        # Without a PID namespace of its own, its init's exit leaves the rest running.
        own_pid_ns = config.linux.security_context.namespace_options.pid == cri.CONTAINER
        started = await monitor.launch(
            self.settings.monitor, runc=self.runc.binary, runc_root=self.runc.root,
            # A pod without a log directory (critest's) keeps no log.
            bundle=bundle, container_id=container.id, log_path=container.log_path or os.devnull,
            tty=config.tty, stdin=config.stdin, stdin_once=config.stdin_once,
            kill_all=not own_pid_ns)
        undo.push("delete container", lambda: self.runc.delete(container.id))
        crash_point("runc_create_container.monitor_started")  # runc created, the record INIT
        self._specs[container.id] = spec
        self._follow(container, started, spec["linux"]["cgroupsPath"])
        user = spec["process"]["user"]
        digests = [d for d in image.repo_digests if d]
        log.info("container created on the host container=%s pod=%s pid=%s monitor_pid=%s",
                 container.id, pod.id, started.container_pid, started.pid)
        return ContainerCreated(
            image_id=image.id,
            image_ref=digests[0] if digests else image.id,
            backend={"bundle": str(bundle), "rootfs": str(target), "imageMounts": keys,
                     "cgroup": spec["linux"]["cgroupsPath"]},
            volume_images=volume_images,
            user=(int(user["uid"]), int(user["gid"]),
                  tuple(int(g) for g in user.get("additionalGids") or ())),
        )

    def _follow(self, container: ContainerRecord, watched_monitor: monitor.Monitor,
                cgroup: str) -> None:
        exited = asyncio.Event()
        task = asyncio.create_task(self._await_exit(container, watched_monitor, cgroup, exited),
                                   name=f"runc-exit-{container.id[:12]}")
        self._watched[container.id] = _Watched(container.pod_id, container, cgroup,
                                               watched_monitor, task, exited)

    async def _await_exit(self, container: ContainerRecord, watched: monitor.Monitor,
                          cgroup: str, exited: asyncio.Event) -> None:
        record = await watched.wait()
        exited.set()
        await self._report_exit(container, record, cgroup, gone=watched.lost)

    async def _report_exit(self, container: ContainerRecord, record: monitor.ExitRecord,
                           cgroup: str, *, gone: bool) -> None:
        oom = bool(cgroup) and await asyncio.to_thread(
            cgroups.oom_killed, cgroup, self.cgroup_version)
        # As containerd does on a task's exit: runc's state and the cgroup go now.
        with contextlib.suppress(CriError):
            await self.runc.delete(container.id)
        if gone:
            reason, message = exit_codes.ERROR, "the container's monitor died"
        else:
            reason, message = exit_reason(record.exit_code, oom), ""
        log.info("container exited container=%s code=%s reason=%s", container.id,
                 record.exit_code, reason)
        await self.context.events.container_exited(
            container.id, record.exit_code, reason, message, record.finished_at)

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        # Taken before: a short-lived process may have exited (and ctrmon stamped its finish)
        # by the time runc start returns.
        started = time.time_ns()
        await self.runc.start(container.id)
        crash_point("runc_start_container.started")  # it runs, the record CREATED
        return started

    async def _kill(self, container_id: str, signum: int) -> None:
        with contextlib.suppress(NotFound, FailedPrecondition):  # it exited meanwhile
            await self.runc.kill(container_id, signum,
                                 all_processes=signum == signal.SIGKILL)

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        watched = self._watched.get(container.id)
        if watched is None or watched.exited.is_set():
            return
        first = signal.SIGKILL if timeout <= 0 else self.stop_signal(container)
        await self._kill(container.id, first)
        if first != signal.SIGKILL:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watched.exited.wait(), timeout)
            if watched.exited.is_set():
                return
            log.info("container ignored its stop signal, killing container=%s", container.id)
            await self._kill(container.id, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watched.exited.wait(), self.settings.stop_grace)

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        await self.runc.delete(container.id)  # kills it if it still runs
        watched = self._watched.pop(container.id, None)
        if watched is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watched.exited.wait(), self.settings.stop_grace)
            watched.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watched.task
        self._specs.pop(container.id, None)
        self._layer_sizes.pop(container.id, None)
        self._nano_cores.forget(container.id)
        await rootfs.unmount(self._rootfs_mount(container.id))
        for key in container.backend.get("imageMounts", ()):
            await self.images.release(key)
        await asyncio.to_thread(shutil.rmtree, self._bundle(container.id), True)
        await rootfs.remove_tree(self._layer_dir(container.id))

    async def container_info(self, pod: PodRecord, container: ContainerRecord) -> dict[str, Any]:
        info: dict[str, Any] = dict(container.backend)
        with contextlib.suppress(CriError, OSError, ValueError):
            info["ociSpec"] = await self._spec(container)
        watched = self._watched.get(container.id)
        if watched is not None:
            info["pid"] = watched.monitor.container_pid
            info["monitorPid"] = watched.monitor.pid
        return info

    async def _spec(self, container: ContainerRecord) -> dict[str, Any]:
        spec = self._specs.get(container.id)
        if spec is None:
            raw = await asyncio.to_thread(
                (self._bundle(container.id) / "config.json").read_bytes)
            spec = json.loads(raw)
            self._specs[container.id] = spec
        return spec

    # -- stats: the containers' cgroups, the pod's parent cgroup, the pod's netns -----------

    def _pod_cgroup(self, pod: PodRecord) -> str:
        return pod.config.linux.cgroup_parent or f"/criserver/{pod.id}"

    async def _layer_bytes(self, container_id: str) -> int:
        """The writable layer's size: a walk of the upper dir, so cached a few seconds."""
        now = time.monotonic()
        cached = self._layer_sizes.get(container_id)
        if cached is not None and now - cached[0] < LAYER_SIZE_TTL:
            return cached[1]
        size = await asyncio.to_thread(rootfs.writable_layer_bytes,
                                       self._layer_dir(container_id) / "upper")
        self._layer_sizes[container_id] = (now, size)
        return size

    async def _container_reading(
        self, container: ContainerRecord
    ) -> tuple[cgroups.CgroupUsage, int] | None:
        watched = self._watched.get(container.id)
        path = watched.cgroup if watched else str(container.backend.get("cgroup", ""))
        if not path:
            return None
        usage = await asyncio.to_thread(cgroups.read_usage, path, self.cgroup_version)
        if not usage.exists:
            return None  # exited: runc deleted its cgroup
        return usage, await self._layer_bytes(container.id)

    async def containers_stats(
        self, pod: PodRecord, containers: list[ContainerRecord]
    ) -> list[cri.ContainerStats]:
        stats = []
        for container in containers:
            reading = await self._container_reading(container)
            if reading is not None:
                usage, layer = reading
                stats.append(cgroups.container_stats(
                    container, usage, layer, self._nano_cores.update(container.id, usage)))
        return stats

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> cri.ContainerStats:
        return await self._stats_from_batch(pod, container)

    async def _interfaces(self, pod: PodRecord) -> list[pb.InterfaceStats]:
        """The pod netns's interfaces, seen through its infra process (none for a
        hostNetwork pod: the node's are kubelet's to report)."""
        if "netns" not in pod.backend or "infraPid" not in pod.backend:
            return []
        with contextlib.suppress(CriError):
            pid = await self._infra_pid(pod)
            return await asyncio.to_thread(interfaces, pid)
        return []

    async def sandbox_stats(self, pod: PodRecord) -> cri.PodSandboxStats:
        usage = await asyncio.to_thread(cgroups.read_usage, self._pod_cgroup(pod),
                                        self.cgroup_version)
        containers = await self.containers_stats(pod, self._containers_of(pod))
        return cgroups.pod_stats(
            pod, usage, containers,
            network_usage(await self._interfaces(pod), usage.timestamp_ns),
            self._nano_cores.update(pod.id, usage))

    async def sandbox_metrics(self, pod: PodRecord) -> PodSample:
        usage = await asyncio.to_thread(cgroups.read_usage, self._pod_cgroup(pod),
                                        self.cgroup_version)
        samples = []
        for container in self._containers_of(pod):
            reading = await self._container_reading(container)
            if reading is not None:
                samples.append(cgroups.container_sample(container.id, *reading))
        return cgroups.pod_sample(usage, samples,
                                  interface_samples(await self._interfaces(pod)))

    def _containers_of(self, pod: PodRecord) -> list[ContainerRecord]:
        return [w.record for w in self._watched.values() if w.pod_id == pod.id]

    async def update_container_resources(
        self, pod: PodRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        update = oci_spec.update_resources(resources)
        if not self._hugetlb:
            update.pop("hugepageLimits", None)
        await self.runc.update(container.id, update)

    async def reopen_container_log(self, pod: PodRecord, container: ContainerRecord) -> None:
        watched = self._watched.get(container.id)
        if watched is None or watched.exited.is_set():
            raise FailedPrecondition(f"container {container.id} is not running")
        await watched.monitor.reopen_log()

    async def exec_sync(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], timeout: float
    ) -> ExecResult:
        out, err = _Collected(MAX_EXEC_OUTPUT), _Collected(MAX_EXEC_OUTPUT)
        # On timeout the exec is cancelled, which kills its process (not just runc).
        try:
            code = await asyncio.wait_for(
                self.exec(pod, container, cmd, tty=False, stdin=None, stdout=out, stderr=err,
                          resize=None), timeout if timeout > 0 else None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"command {cmd!r} timed out after {timeout}s and was killed") from None
        return ExecResult(exit_code=code, stdout=bytes(out.data), stderr=bytes(err.data))

    # -- streaming (kubectl exec/attach/port-forward): relays in streams.py -------------------

    async def exec(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        return await streams.exec_in_container(
            self.runc, self.settings.monitor, self._bundle(container.id), container.id,
            await self._spec(container), cmd, tty=tty, stdin=stdin, stdout=stdout,
            stderr=stderr, resize=resize)

    async def attach(
        self, pod: PodRecord, container: ContainerRecord, *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> None:
        watched = self._watched.get(container.id)
        if watched is None or watched.exited.is_set():
            raise FailedPrecondition(f"container {container.id} is not running")
        await streams.attach_container(watched.monitor, tty=tty, stdin=stdin, stdout=stdout,
                                       stderr=stderr, resize=resize)

    async def port_forward(
        self, pod: PodRecord, port: int, *, inbound: ByteSource, outbound: ByteSink
    ) -> None:
        netns_path = pod.backend.get("netns")
        await streams.port_forward(Path(netns_path) if netns_path else None, port,
                                   inbound=inbound, outbound=outbound)


class _Collected:
    """A sink keeping what ExecSync returns: at most `limit` bytes, the rest dropped."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit

    async def write(self, data: bytes) -> None:
        self.data += data[:max(self.limit - len(self.data), 0)]

    async def close(self) -> None:
        return None


async def _together(first: Coroutine[Any, Any, A] | None, second: Coroutine[Any, Any, B] | None
                    ) -> tuple[A | None, B | None]:
    """Both at once (None: nothing to run). If one fails the other is cancelled and awaited
    (its undo steps are registered as it goes), then the first error is raised."""
    tasks = [asyncio.ensure_future(c) if c is not None else None for c in (first, second)]
    running = [t for t in tasks if t is not None]
    try:
        if running:
            await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    for task in running:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return (tasks[0].result() if tasks[0] else None,  # type: ignore[return-value]
            tasks[1].result() if tasks[1] else None)


def _process_start_ns(pid: int) -> int:
    """When process `pid` began, in ns since the epoch (0 if it is gone or unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime, field 22 of stat(5): clock ticks after boot
        boot = next(int(line.split()[1]) for line in
                    Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return 0
    return boot * 1_000_000_000 + ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def _infra_id(pod_id: str) -> str:
    return f"pod-{pod_id}"


def _with_pid_mode(config: cri.ContainerConfig, mode: int) -> cri.ContainerConfig:
    changed = cri.ContainerConfig()
    changed.CopyFrom(config)
    changed.linux.security_context.namespace_options.pid = mode  # type: ignore[assignment]
    return changed


def _sub_path(root: Path, sub_path: str) -> Path:
    """`sub_path` of an image volume, which must stay inside the image."""
    if not sub_path:
        return root
    resolved = (root / sub_path.lstrip("/")).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InvalidArgument(f"image sub path {sub_path!r} leaves the image")
    if not resolved.exists():
        raise NotFound(f"image sub path {sub_path!r} does not exist in the image")
    return resolved


def _host_spec(generated: oci_spec.GeneratedSpec, rootfs_path: Path) -> dict[str, Any]:
    """The generated spec made runnable here: the rootfs, the user as the image's own
    /etc/passwd and /etc/group resolve it, the host's devices for a privileged container.
    Blocking (reads the rootfs and /dev)."""
    spec: dict[str, Any] = json.loads(generated.to_json())
    spec["root"]["path"] = str(rootfs_path)
    process = spec["process"]
    extra = [int(g) for g in process.get("user", {}).get("additionalGids") or []]
    try:
        user = resolve_in_rootfs(generated.user_text(), str(rootfs_path), extra,
                                 generated.merge_image_groups)
    except GRPCError as exc:
        # The agent's resolver speaks gRPC (INVALID_ARGUMENT: a user or group the image does
        # not have); unmapped here it reached the caller as INTERNAL.
        raise InvalidArgument(str(exc.message)) from None
    set_process_user(process, user)
    # ctrmon runs at -999: the container must not inherit that.
    process.setdefault("oomScoreAdj", 0)
    # No process gets a capability beyond the daemon's bounding set (a privileged container
    # asks for all of them: as Docker, it gets all the daemon can give).
    held = _held_capabilities()
    caps = process.get("capabilities") or {}
    for kind, names in caps.items():
        caps[kind] = [name for name in names if name in held]
    if generated.guest_devices:
        listed = spec["linux"].get("devices") or []
        taken = {d.get("path") for d in listed}
        spec["linux"]["devices"] = listed + [d for d in guest_devices("/dev")
                                             if d["path"] not in taken]
    return spec


def _held_capabilities() -> frozenset[str]:
    """The capabilities in this process's bounding set (all of them on most hosts)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("CapBnd:")), 16)
    except (OSError, StopIteration, ValueError):
        return frozenset(oci_spec.ALL_CAPS)
    return frozenset(cap for cap, bit in oci_spec.CAP_NUMBER.items() if mask >> bit & 1)


def _write_bundle(bundle: Path, spec: dict[str, Any]) -> None:
    bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
    files.write_atomic(bundle / "config.json", json.dumps(spec))


def _write_pod_files(pod_dir: Path, config: cri.PodSandboxConfig, ips: tuple[str, ...],
                     host_network: bool) -> None:
    if host_network:
        # The node's own name and hosts file, as containerd gives a hostNetwork pod.
        hostname = socket.gethostname()
        try:
            hosts = Path("/etc/hosts").read_text()
        except OSError:
            hosts = pod_files.hosts(hostname, [])
    else:
        hostname = pod_files.pod_hostname(config)
        hosts = pod_files.hosts(hostname, ips)
    for name, text in (("hostname", hostname + "\n"), ("hosts", hosts),
                       ("resolv.conf", pod_files.resolv_conf(config.dns_config))):
        files.write_atomic(pod_dir / name, text)
