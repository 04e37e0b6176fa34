"""Limits and checks on CRI requests, so bad input fails early with INVALID_ARGUMENT."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import InvalidArgument

MAX_NAME = 253  # a DNS subdomain, as Kubernetes object names are
MAX_UID = 128
MAX_MAP_BYTES = 256 * 1024  # Kubernetes' limit on the total size of annotations


def require(value: str, what: str, limit: int = MAX_NAME) -> None:
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    check_length(value, what, limit)


def check_length(value: str, what: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {limit}")


def check_map(values: Mapping[str, str], what: str) -> None:
    size = sum(len(k) + len(v) for k, v in values.items())
    if size > MAX_MAP_BYTES:
        raise InvalidArgument(f"{what} total {size} bytes; the limit is {MAX_MAP_BYTES}")
    if "" in values:
        raise InvalidArgument(f"{what} must not have an empty key")


def pod_config(config: cri.PodSandboxConfig) -> None:
    if not config.HasField("metadata"):
        raise InvalidArgument("pod sandbox config must include metadata")
    meta = config.metadata
    require(meta.name, "pod sandbox metadata.name")
    require(meta.namespace, "pod sandbox metadata.namespace")
    require(meta.uid, "pod sandbox metadata.uid", MAX_UID)
    check_length(config.hostname, "hostname", 64)
    check_length(config.log_directory, "log_directory", 4096)
    check_map(config.labels, "labels")
    check_map(config.annotations, "annotations")


def container_config(config: cri.ContainerConfig) -> None:
    if not config.HasField("metadata"):
        raise InvalidArgument("container config must include metadata")
    require(config.metadata.name, "container metadata.name")
    require(config.image.image, "container image", 4096)
    check_length(config.log_path, "log_path", 4096)
    check_map(config.labels, "labels")
    check_map(config.annotations, "annotations")
    for arg in (*config.command, *config.args):
        check_length(arg, "command argument", 128 * 1024)
    for mount in config.mounts:
        if mount.HasField("image") and mount.image.image:
            image_mount(mount)


def image_mount(mount: cri.Mount) -> None:
    """An image volume (Mount.image, KEP 4639): read-only by definition, no host path, and a
    sub path that stays inside the image."""
    where = f"image volume at {mount.container_path!r}"
    if mount.host_path:
        raise InvalidArgument(f"{where}: host_path and image are mutually exclusive")
    if not mount.readonly:
        raise InvalidArgument(f"{where}: image volumes are read-only, readonly must be set")
    sub_path = mount.image_sub_path
    check_length(sub_path, "image_sub_path", 4096)
    if posixpath.isabs(sub_path) or ".." in sub_path.split("/") or "\0" in sub_path:
        raise InvalidArgument(f"{where}: image_sub_path {sub_path!r} is not a relative path "
                              "inside the image")
