"""The typed records of pods and containers, and how they are persisted.

Records are immutable: a change is a new record made with `dataclasses.replace`, passed through
the store's one update function, which checks the state transition and persists it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from criserver.api.runtime.v1 import api_pb2 as cri


class PodState(enum.StrEnum):
    INIT = "init"  # being created: not listed, cleaned up at start if the daemon died meanwhile
    READY = "ready"
    NOTREADY = "notready"


class ContainerState(enum.StrEnum):
    INIT = "init"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


POD_TRANSITIONS: dict[PodState, set[PodState]] = {
    PodState.INIT: {PodState.READY, PodState.NOTREADY},
    PodState.READY: {PodState.NOTREADY},
    PodState.NOTREADY: set(),
}

CONTAINER_TRANSITIONS: dict[ContainerState, set[ContainerState]] = {
    ContainerState.INIT: {ContainerState.CREATED, ContainerState.UNKNOWN},
    ContainerState.CREATED: {ContainerState.RUNNING, ContainerState.EXITED, ContainerState.UNKNOWN},
    ContainerState.RUNNING: {ContainerState.EXITED, ContainerState.UNKNOWN},
    ContainerState.EXITED: set(),
    ContainerState.UNKNOWN: {ContainerState.EXITED},
}

CRI_POD_STATE = {
    PodState.INIT: cri.SANDBOX_NOTREADY,
    PodState.READY: cri.SANDBOX_READY,
    PodState.NOTREADY: cri.SANDBOX_NOTREADY,
}

CRI_CONTAINER_STATE = {
    ContainerState.INIT: cri.CONTAINER_UNKNOWN,
    ContainerState.CREATED: cri.CONTAINER_CREATED,
    ContainerState.RUNNING: cri.CONTAINER_RUNNING,
    ContainerState.EXITED: cri.CONTAINER_EXITED,
    ContainerState.UNKNOWN: cri.CONTAINER_UNKNOWN,
}


@dataclass(frozen=True)
class PodRecord:
    id: str
    config: cri.PodSandboxConfig
    runtime_handler: str
    created_at: int
    routed_by: str = ""  # why a pod that named no handler got this one (runtime/routing.py)
    state: PodState = PodState.INIT
    reason: str = ""  # why the pod is NOTREADY when it was not asked to stop
    message: str = ""
    ips: tuple[str, ...] = ()
    # Owned by the backend: whatever it needs to find the pod's resources again after a restart.
    backend: dict[str, Any] = field(default_factory=dict)

    @property
    def name_key(self) -> str:
        m = self.config.metadata
        return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.config.labels)

    def to_row(self) -> tuple[str, bytes, str]:
        doc = _doc(self, skip={"id", "config"})
        return self.id, self.config.SerializeToString(), json.dumps(doc)

    @classmethod
    def from_row(cls, id_: str, config: bytes, record: str) -> PodRecord:
        doc = json.loads(record)
        doc["state"] = PodState(doc["state"])
        doc["ips"] = tuple(doc.get("ips", ()))
        return cls(id=id_, config=cri.PodSandboxConfig.FromString(config), **doc)

    def to_cri(self) -> cri.PodSandbox:
        return cri.PodSandbox(
            id=self.id,
            metadata=self.config.metadata,
            state=CRI_POD_STATE[self.state],
            created_at=self.created_at,
            labels=self.config.labels,
            annotations=self.config.annotations,
            runtime_handler=self.runtime_handler,
        )

    def to_cri_status(self) -> cri.PodSandboxStatus:
        ips = list(self.ips)
        network = cri.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "",
            additional_ips=[cri.PodIP(ip=ip) for ip in ips[1:]],
        )
        namespace_options = self.config.linux.security_context.namespace_options
        return cri.PodSandboxStatus(
            id=self.id,
            metadata=self.config.metadata,
            state=CRI_POD_STATE[self.state],
            created_at=self.created_at,
            network=network,
            linux=cri.LinuxPodSandboxStatus(
                namespaces=cri.Namespace(options=namespace_options)
            ),
            labels=self.config.labels,
            annotations=self.config.annotations,
            runtime_handler=self.runtime_handler,
        )


@dataclass(frozen=True)
class ContainerExit:
    """How a container's process ended (finished_at 0: when it is recorded)."""

    code: int
    reason: str
    message: str = ""
    finished_at: int = 0


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    pod_id: str
    config: cri.ContainerConfig
    created_at: int
    image_id: str = ""  # resolved image ("sha256:..."), "" when the backend takes refs as given
    image_ref: str = ""  # the repo digest the image was pulled by, if known
    log_path: str = ""  # absolute: pod log_directory joined with the config's log_path
    state: ContainerState = ContainerState.INIT
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    backend: dict[str, Any] = field(default_factory=dict)
    # Image volumes (Mount.image): the id of the image mounted at each container_path.
    volume_images: dict[str, str] = field(default_factory=dict)
    # What the process runs as, as the backend resolved it: uid, gid, supplementary gids.
    user: tuple[int, int, tuple[int, ...]] | None = None
    # An exit the backend reported while the container was still CREATED (before StartContainer
    # recorded RUNNING): persisted so it survives a restart, applied once RUNNING is recorded.
    early_exit: ContainerExit | None = None

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.config.labels)

    def uses_image(self, image_id: str) -> bool:
        return self.image_id == image_id or image_id in self.volume_images.values()

    def name_key(self, pod: PodRecord) -> str:
        m, p = self.config.metadata, pod.config.metadata
        return f"{m.name}_{p.name}_{p.namespace}_{p.uid}_{m.attempt}"

    def to_row(self) -> tuple[str, str, bytes, str]:
        doc = _doc(self, skip={"id", "pod_id", "config"})
        return self.id, self.pod_id, self.config.SerializeToString(), json.dumps(doc)

    @classmethod
    def from_row(cls, id_: str, pod_id: str, config: bytes, record: str) -> ContainerRecord:
        doc = json.loads(record)
        doc["state"] = ContainerState(doc["state"])
        if doc.get("user") is not None:
            uid, gid, groups = doc["user"]
            doc["user"] = (uid, gid, tuple(groups))
        if doc.get("early_exit") is not None:
            doc["early_exit"] = ContainerExit(**doc["early_exit"])
        return cls(id=id_, pod_id=pod_id, config=cri.ContainerConfig.FromString(config), **doc)

    def to_cri(self) -> cri.Container:
        return cri.Container(
            id=self.id,
            pod_sandbox_id=self.pod_id,
            metadata=self.config.metadata,
            image=self._image_spec(),
            image_ref=self.image_ref or self.image_id,
            image_id=self.image_id,
            state=CRI_CONTAINER_STATE[self.state],
            created_at=self.created_at,
            labels=self.config.labels,
            annotations=self.config.annotations,
        )

    def to_cri_status(self) -> cri.ContainerStatus:
        return cri.ContainerStatus(
            id=self.id,
            metadata=self.config.metadata,
            state=CRI_CONTAINER_STATE[self.state],
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            exit_code=self.exit_code,
            image=self._image_spec(),
            image_ref=self.image_ref or self.image_id,
            image_id=self.image_id,
            reason=self.reason,
            message=self.message,
            labels=self.config.labels,
            annotations=self.config.annotations,
            mounts=self._mounts(),
            log_path=self.log_path,
            resources=cri.ContainerResources(linux=self.config.linux.resources)
            if self.config.linux.HasField("resources")
            else None,
            user=self._user(),
        )

    def _mounts(self) -> list[cri.Mount]:
        if not self.volume_images:
            return list(self.config.mounts)
        mounts = []
        for mount in self.config.mounts:
            image_id = self.volume_images.get(mount.container_path) if mount.image.image else None
            if image_id:
                reported = cri.Mount()
                reported.CopyFrom(mount)
                reported.image.image_ref = image_id  # the id PullImage returned for it
                mount = reported
            mounts.append(mount)
        return mounts

    def _user(self) -> cri.ContainerUser | None:
        if self.user is None:
            return None
        uid, gid, groups = self.user
        return cri.ContainerUser(linux=cri.LinuxContainerUser(
            uid=uid, gid=gid, supplemental_groups=groups))

    def _image_spec(self) -> cri.ImageSpec:
        # The image as the caller named it; image_id/image_ref carry the resolved identity.
        return self.config.image


def _doc(record: Any, skip: set[str]) -> dict[str, Any]:
    doc = {}
    for f in dataclasses.fields(record):
        if f.name in skip:
            continue
        value = getattr(record, f.name)
        if isinstance(value, ContainerExit):
            value = dataclasses.asdict(value)
        doc[f.name] = list(value) if isinstance(value, tuple) else value
    return doc
