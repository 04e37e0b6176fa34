"""Limits and checks on CRI requests, so bad input fails early with INVALID_ARGUMENT."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.errors import InvalidArgument

MAX_NAME = 253  # a DNS subdomain, as Kubernetes object names are
MAX_UID = 128
MAX_MAP_BYTES = 256 * 1024  # Kubernetes' limit on the total size of annotations
MAX_ID = 1 << 32  # uids and gids are 32-bit


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


def defined_enums(message: Message, what: str) -> None:
    """Every enum in `message` holds a value the CRI defines. proto3 enums are open: a number
    no CRI version has (or a newer one's) arrives as it is, and a namespace mode or a
    propagation nobody knows must not fall through to some default.
    """
    for field, value in message.ListFields():
        items = value if field.is_repeated else (value,)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                entry_value = field.message_type.fields_by_name["value"]
                if entry_value.type != FieldDescriptor.TYPE_MESSAGE:
                    continue
                items = tuple(value.values())
            for item in items:
                defined_enums(item, what)
        elif field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
            for number in items:
                if field.enum_type.values_by_number.get(number) is None:
                    raise InvalidArgument(f"{what}: {field.name} = {number} is not a value "
                                          f"of {field.enum_type.name}")


def pod_config(config: cri.PodSandboxConfig) -> None:
    if not config.HasField("metadata"):
        raise InvalidArgument("pod sandbox config must include metadata")
    meta = config.metadata
    require(meta.name, "pod sandbox metadata.name")
    require(meta.namespace, "pod sandbox metadata.namespace")
    require(meta.uid, "pod sandbox metadata.uid", MAX_UID)
    check_length(config.hostname, "hostname", 64)
    check_length(config.log_directory, "log_directory", 4096)
    if config.log_directory and (not posixpath.isabs(config.log_directory)
                                 or "\0" in config.log_directory):
        # Relative, it would be resolved against the daemon's working directory.
        raise InvalidArgument(f"log_directory {config.log_directory!r} is not an absolute path")
    check_map(config.labels, "labels")
    check_map(config.annotations, "annotations")
    defined_enums(config, "pod sandbox config")
    user_namespace(config.linux.security_context.namespace_options)


def user_namespace(options: cri.NamespaceOption) -> bool:
    """Whether the pod asks for a user namespace of its own (mode POD), with its mappings
    checked: one uid and one gid mapping, each mapping the container's root (what kubelet
    sends, and what the pod's idmapped mounts are built for). NODE means none.
    """
    if not options.HasField("userns_options"):
        return False
    userns = options.userns_options
    if userns.mode == cri.NODE:
        if userns.uids or userns.gids:
            raise InvalidArgument("user namespace mode NODE takes no uid or gid mappings")
        return False
    if userns.mode != cri.POD:
        raise InvalidArgument(f"user namespace mode {_enum_name(cri.NamespaceMode, userns.mode)} "
                              "is not supported: only POD and NODE")
    for what, mappings in (("uid", userns.uids), ("gid", userns.gids)):
        if len(mappings) != 1:
            raise InvalidArgument(f"user namespace mode POD needs exactly one {what} mapping, "
                                  f"got {len(mappings)}")
        m = mappings[0]
        if m.container_id != 0:
            raise InvalidArgument(f"user namespace {what} mapping must map container id 0, "
                                  f"starts at {m.container_id}")
        if m.length == 0 or m.host_id + m.length > MAX_ID:
            raise InvalidArgument(f"user namespace {what} mapping host_id={m.host_id} "
                                  f"length={m.length} is out of range")
    return True


def container_config(config: cri.ContainerConfig) -> None:
    if not config.HasField("metadata"):
        raise InvalidArgument("container config must include metadata")
    require(config.metadata.name, "container metadata.name")
    require(config.image.image, "container image", 4096)
    check_length(config.log_path, "log_path", 4096)
    if "\0" in config.log_path:
        raise InvalidArgument("log_path contains a NUL byte")
    check_map(config.labels, "labels")
    check_map(config.annotations, "annotations")
    defined_enums(config, "container config")
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


def _enum_name(enum: object, number: int) -> str:
    """The name of `number` in a generated enum, or the number when it names nothing."""
    try:
        return str(enum.Name(number))  # type: ignore[attr-defined]
    except ValueError:
        return str(number)
