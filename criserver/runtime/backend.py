"""The sandbox backend seam: what the runtime needs from whatever runs pods.

A backend is a Python class named by a runtime handler in the config, either an entry point
of the group ``criserver.backends`` or ``module:Class``; third parties ship their own package and
configure it without touching the daemon. `BaseBackend` answers every call UNIMPLEMENTED, so a
backend overrides only what it supports and never fakes success.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import signal
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import CriError, InvalidArgument, NotFound, Unimplemented
from criserver.runtime.metric_sample import PodSample, from_stats
from criserver.runtime.streaming.interface import ByteSink, ByteSource, ResizeSource
from criserver.store.records import ContainerRecord, PodRecord

if TYPE_CHECKING:
    from criserver.config import Config
    from criserver.runtime.undo import UndoStack

ENTRY_POINT_GROUP = "criserver.backends"
T = TypeVar("T")


class BackendEvents(Protocol):
    """How a backend reports what happens on its own (a VM dies, a process exits)."""

    async def sandbox_exited(self, pod_id: str, reason: str, message: str) -> None: ...

    async def container_started(self, container_id: str, started_at: int) -> None:
        """A CREATED container found running (a daemon that died inside StartContainer after
        the backend started it): record what is true, RUNNING."""

    async def container_exited(
        self, container_id: str, exit_code: int, reason: str, message: str, finished_at: int
    ) -> None: ...


class ImageView(Protocol):
    """What a backend may read of an image record (criserver.store.images.ImageRecord)."""

    @property
    def id(self) -> str:
        """``sha256:<config digest>``"""

    @property
    def repo_digests(self) -> list[str]: ...

    @property
    def config(self) -> dict[str, Any]:
        """What containers need of the image config (criserver.image.manifest.ImageConfigInfo
        as a dict): entrypoint, cmd, env, user, stop_signal..."""


class ImageLookup(Protocol):
    """What a backend may ask of the image service (criserver.image.service.ImageService)."""

    def get(self, text: str) -> ImageView | None:
        """The image record named by an id, tag or digest reference, if pulled."""

    def get_by_id(self, image_id: str) -> ImageView | None:
        """The record of an image id, also of one removed while containers still use it."""

    def snapshot_path(self, image_id: str) -> Path:
        """The image's root filesystem as a read-only EROFS image, inside `snapshots_dir`."""

    @property
    def snapshots_dir(self) -> Path:
        """The directory holding every image's `snapshot_path` (a backend may share it whole
        with its sandboxes, read-only)."""


class DaemonShared:
    """What the backends of one daemon share (the pod network's CNI manager, the VM host's
    facts): made by the first backend that asks, under a key naming what would make two differ.
    The runtime knows nothing of what is kept here."""

    def __init__(self) -> None:
        self._objects: dict[Hashable, object] = {}

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        if key not in self._objects:
            self._objects[key] = make()
        return cast(T, self._objects[key])


@dataclass(frozen=True)
class BackendContext:
    handler: str
    root: Path  # persistent directory of this handler's backend
    state: Path  # volatile directory of this handler's backend
    config: Config
    events: BackendEvents
    images: ImageLookup | None = None
    shared: DaemonShared = field(default_factory=DaemonShared)


@dataclass(frozen=True)
class BackendStatus:
    runtime_ready: bool
    runtime_reason: str = ""
    runtime_message: str = ""
    network_ready: bool = False
    network_reason: str = ""
    network_message: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # host facts for Status verbose


@dataclass(frozen=True)
class BackendFeatures:
    """What a backend's pods support, reported per runtime handler in Status (kubelet refuses
    pods that need a feature their handler lacks). Declared once per backend class."""

    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False  # user namespaces and idmap mounts, as Kubernetes needs them
    # exec, attach and port_forward: without it Exec, Attach and PortForward answer
    # UNIMPLEMENTED at once rather than with a URL that can only fail.
    streaming: bool = False


@dataclass(frozen=True)
class SandboxStarted:
    ips: tuple[str, ...] = ()
    backend: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerCreated:
    image_id: str = ""
    image_ref: str = ""
    backend: dict[str, Any] = field(default_factory=dict)
    # container_path -> image id of each image volume (Mount.image) the backend mounted.
    volume_images: dict[str, str] = field(default_factory=dict)
    # uid, gid, supplementary gids the process runs with (ContainerStatus.user), if known.
    user: tuple[int, int, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@runtime_checkable
class SandboxBackend(Protocol):
    """Everything the runtime asks of a backend.

    Which calls may overlap (the runtime's locks, criserver/runtime/locks.py):
    - `start` (start-up recovery) runs before the CRI is served, so before any other call.
    - A pod's lifecycle calls (`run_sandbox`, `stop_sandbox`, `remove_sandbox`) run alone:
      never with each other, nor with any container lifecycle call of that pod.
    - A container's lifecycle calls (`create_container`, `start_container`,
      `stop_container`, `remove_container`, `update_container_resources`) never overlap each
      other; those of different containers of one pod may run at the same time.
    - Every other call holds no lock and may overlap anything, its pod's stop and remove
      included: `status`, the info, stats and metrics queries, `reopen_container_log`,
      `exec_sync` and the streaming calls (a session lasts as long as the client wants: it
      must not hold up a stop). The backend answers them from what it has, with an error
      (NotFound, FailedPrecondition) once the pod or container is gone; `stop_sandbox` ends
      the ones still running in the pod.
    """

    features: BackendFeatures

    async def start(self, pods: list[PodRecord], containers: list[ContainerRecord]) -> None:
        """Daemon start: re-adopt the live sandboxes of this handler, clean up the dead."""

    async def close(self) -> None:
        """Daemon stop: let go of connections; running sandboxes keep running."""

    async def status(self) -> BackendStatus: ...

    async def set_pod_cidr(self, cidr: str) -> None:
        """kubelet's UpdateRuntimeConfig: the node's pod CIDR, for the backend's network."""

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        """Start the pod; register an undo for every resource made, in order."""

    async def stop_sandbox(self, pod: PodRecord) -> None:
        """Stop the pod and everything in it; idempotent."""

    async def remove_sandbox(self, pod: PodRecord) -> None:
        """Remove what the pod left on disk; idempotent, also when stop never ran."""

    async def sandbox_info(self, pod: PodRecord) -> dict[str, Any]: ...

    async def sandbox_stats(self, pod: PodRecord) -> cri.PodSandboxStats: ...

    async def sandbox_metrics(self, pod: PodRecord) -> PodSample:
        """The pod and its containers measured for the CRI metrics, in one go."""

    async def create_container(
        self, pod: PodRecord, container: ContainerRecord, undo: UndoStack
    ) -> ContainerCreated: ...

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        """Start it and return the start time in ns."""

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None: ...

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None: ...

    async def container_info(
        self, pod: PodRecord, container: ContainerRecord
    ) -> dict[str, Any]: ...

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> cri.ContainerStats: ...

    async def containers_stats(
        self, pod: PodRecord, containers: list[ContainerRecord]
    ) -> list[cri.ContainerStats]:
        """Stats of several containers of `pod` in one go (ListContainerStats asks once per
        pod); a container that has none (stopped meanwhile) is left out, not an error."""

    async def update_container_resources(
        self, pod: PodRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None: ...

    async def reopen_container_log(self, pod: PodRecord, container: ContainerRecord) -> None: ...

    async def exec_sync(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], timeout: float
    ) -> ExecResult: ...

    # -- streaming (kubectl exec/attach/port-forward), declared by `features.streaming` ------
    # Cancellation means the client went away (or the daemon stops): `exec` kills the process
    # it started, `attach` detaches (the container keeps running), `port_forward` closes the
    # connection into the pod. A sink or source of a cancelled call must not be used afterwards.

    async def exec(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        """Run `cmd` in the container, relay its stdio until it exits and its output is
        written, and return its exit code (128 + N when killed by signal N).

        With `tty`, stdout carries the terminal's output and stderr is None. Raise (any
        exception) when the command cannot be run at all: the client sees the message.
        """

    async def attach(
        self, pod: PodRecord, container: ContainerRecord, *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> None:
        """Relay the running container's main process stdio until it exits."""

    async def port_forward(
        self, pod: PodRecord, port: int, *, inbound: ByteSource, outbound: ByteSink
    ) -> None:
        """Connect to `port` inside the pod's network namespace and relay both ways: `inbound`
        ends when the client half-closes (shut down writing to the port then); close
        `outbound` at the port's EOF. Return when both directions are done.

        Raise (e.g. ConnectionRefusedError) when the port cannot be reached: the client sees
        the message on the request's error stream.
        """


class BaseBackend:
    """A backend that supports nothing: subclasses override what they implement."""

    name = "base"
    features = BackendFeatures()

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None:
        self.options = options
        self.context = context

    def stop_signal(self, container: ContainerRecord) -> int:
        """The signal StopContainer sends first: the image's STOPSIGNAL, else SIGTERM."""
        images = self.context.images
        image = images.get_by_id(container.image_id) if images and container.image_id else None
        name = str(image.config.get("stop_signal") or "") if image is not None else ""
        if name:
            with contextlib.suppress(KeyError, ValueError):
                return int(name) if name.isdigit() else int(
                    signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        return signal.SIGTERM

    def _unimplemented(self, what: str) -> Unimplemented:
        return Unimplemented(f"{what} is not implemented by the {self.name!r} backend "
                             f"(runtime handler {self.context.handler!r})")

    async def start(self, pods: list[PodRecord], containers: list[ContainerRecord]) -> None:
        return None

    async def close(self) -> None:
        return None

    async def status(self) -> BackendStatus:
        return BackendStatus(runtime_ready=True, network_ready=False,
                             network_reason="NetworkPluginNotReady",
                             network_message=f"the {self.name!r} backend has no network support")

    async def set_pod_cidr(self, cidr: str) -> None:
        return None

    async def run_sandbox(self, pod: PodRecord, undo: UndoStack) -> SandboxStarted:
        raise self._unimplemented("RunPodSandbox")

    async def stop_sandbox(self, pod: PodRecord) -> None:
        raise self._unimplemented("StopPodSandbox")

    async def remove_sandbox(self, pod: PodRecord) -> None:
        raise self._unimplemented("RemovePodSandbox")

    async def sandbox_info(self, pod: PodRecord) -> dict[str, Any]:
        return {}

    async def sandbox_stats(self, pod: PodRecord) -> cri.PodSandboxStats:
        raise self._unimplemented("PodSandboxStats")

    async def sandbox_metrics(self, pod: PodRecord) -> PodSample:
        # A backend with stats has the metrics they carry.
        return from_stats(await self.sandbox_stats(pod))

    async def create_container(
        self, pod: PodRecord, container: ContainerRecord, undo: UndoStack
    ) -> ContainerCreated:
        raise self._unimplemented("CreateContainer")

    async def start_container(self, pod: PodRecord, container: ContainerRecord) -> int:
        raise self._unimplemented("StartContainer")

    async def stop_container(
        self, pod: PodRecord, container: ContainerRecord, timeout: float
    ) -> None:
        raise self._unimplemented("StopContainer")

    async def remove_container(self, pod: PodRecord, container: ContainerRecord) -> None:
        raise self._unimplemented("RemoveContainer")

    async def container_info(self, pod: PodRecord, container: ContainerRecord) -> dict[str, Any]:
        return {}

    async def container_stats(
        self, pod: PodRecord, container: ContainerRecord
    ) -> cri.ContainerStats:
        raise self._unimplemented("ContainerStats")

    async def _stats_from_batch(
        self, pod: PodRecord, container: ContainerRecord
    ) -> cri.ContainerStats:
        """`container_stats` of a backend that overrides `containers_stats`."""
        for stats in await self.containers_stats(pod, [container]):
            return stats
        raise NotFound(f"container {container.id} has no stats: it is not running")

    async def containers_stats(
        self, pod: PodRecord, containers: list[ContainerRecord]
    ) -> list[cri.ContainerStats]:
        # One container at a time: a backend that measures a pod at once overrides this.
        stats = []
        for container in containers:
            try:
                stats.append(await self.container_stats(pod, container))
            except Unimplemented:
                raise
            except CriError:
                continue  # stopped meanwhile
        return stats

    async def update_container_resources(
        self, pod: PodRecord, container: ContainerRecord, resources: cri.LinuxContainerResources
    ) -> None:
        raise self._unimplemented("UpdateContainerResources")

    async def reopen_container_log(self, pod: PodRecord, container: ContainerRecord) -> None:
        raise self._unimplemented("ReopenContainerLog")

    async def exec_sync(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], timeout: float
    ) -> ExecResult:
        raise self._unimplemented("ExecSync")

    async def exec(
        self, pod: PodRecord, container: ContainerRecord, cmd: list[str], *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> int:
        raise self._unimplemented("Exec")

    async def attach(
        self, pod: PodRecord, container: ContainerRecord, *, tty: bool,
        stdin: ByteSource | None, stdout: ByteSink | None, stderr: ByteSink | None,
        resize: ResizeSource | None,
    ) -> None:
        raise self._unimplemented("Attach")

    async def port_forward(
        self, pod: PodRecord, port: int, *, inbound: ByteSource, outbound: ByteSink
    ) -> None:
        raise self._unimplemented("PortForward")


def load_backend_class(spec: str) -> type:
    """The class named by `spec`: an entry point name or ``module:Class``.

    :raises InvalidArgument: nothing by that name can be loaded.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as exc:
            raise InvalidArgument(f"backend {spec!r} cannot be loaded: {exc}") from exc
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == spec:
            return entry_point.load()  # type: ignore[no-any-return]
    raise InvalidArgument(
        f"no backend named {spec!r}: give an entry point of group {ENTRY_POINT_GROUP} "
        "or module:Class"
    )
