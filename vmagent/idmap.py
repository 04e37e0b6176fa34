"""User namespace ID mappings of a pod, and idmapped mounts (open_tree + mount_setattr
MOUNT_ATTR_IDMAP + move_mount) that show an image's files owned by the pod's mapped IDs.
The guest's 6.1 kernel idmaps erofs but neither tmpfs nor overlayfs: image layers are idmapped
and the overlay goes on top. Every function here blocks: callers run them in a thread.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MAX_ID = 1 << 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class IdMaps:
    """uid and gid mappings as /proc/<pid>/uid_map lines: (container id, guest id, length)."""

    uids: tuple[tuple[int, int, int], ...]
    gids: tuple[tuple[int, int, int], ...]

    def uid_map(self) -> str:
        return "".join(f"{c} {h} {n}\n" for c, h, n in self.uids)

    def gid_map(self) -> str:
        return "".join(f"{c} {h} {n}\n" for c, h, n in self.gids)

    def root(self) -> tuple[int, int]:
        """The guest uid and gid of the container's root."""
        return _to_guest(self.uids, 0, "uid"), _to_guest(self.gids, 0, "gid")

    def key(self) -> str:
        return f"{self.uid_map()}|{self.gid_map()}"


def _to_guest(mapping: tuple[tuple[int, int, int], ...], cid: int, what: str) -> int:
    for c, h, n in mapping:
        if c <= cid < c + n:
            return h + cid - c
    raise GRPCError(Status.INVALID_ARGUMENT, f"user namespace: container {what} {cid} unmapped")


def _mapping(entries: Any, what: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for e in entries or []:
        try:
            c, h, n = int(e["containerID"]), int(e["hostID"]), int(e["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"user namespace: bad {what} entry {e!r}") from exc
        if n <= 0 or c < 0 or h < 0 or c + n > _MAX_ID or h + n > _MAX_ID:
            raise GRPCError(Status.INVALID_ARGUMENT, f"user namespace: bad {what} entry {e!r}")
        out.append((c, h, n))
    if not out:
        raise GRPCError(Status.INVALID_ARGUMENT, f"user namespace without {what}")
    return tuple(out)


def spec_id_maps(spec: dict[str, Any]) -> IdMaps | None:
    """The mappings of a spec that asks for a new user namespace (an entry without a path:
    the pod's, which the agent creates); None without one."""
    linux = spec.get("linux") or {}
    wanted = [ns for ns in linux.get("namespaces") or [] if ns.get("type") == "user"]
    if not wanted:
        return None
    if any(ns.get("path") for ns in wanted):
        raise GRPCError(Status.INVALID_ARGUMENT,
                        "user namespace paths are the agent's: give the pod's mappings instead")
    maps = IdMaps(_mapping(linux.get("uidMappings"), "uidMappings"),
                  _mapping(linux.get("gidMappings"), "gidMappings"))
    maps.root()  # the container's root must be mapped: runc and the rootfs need it
    return maps


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def idmapped_clone(source: str, target: str, userns_path: str) -> None:
    """Mount a copy of the mount at `source` on `target`, its files' owners shifted by the
    mappings of the user namespace at `userns_path` (an idmapped mount)."""
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, source.encode(),
                                _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC),
                  f"open_tree {source}")
    try:
        userns = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # struct mount_attr: attr_set, attr_clr, propagation, userns_fd (u64 each)
            attr = ctypes.create_string_buffer(struct.pack("=QQQQ", _MOUNT_ATTR_IDMAP, 0, 0,
                                                           userns), 32)
            _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, attr, 32),
                   f"mount_setattr idmap {source}")
        finally:
            os.close(userns)
        _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target.encode(),
                             _MOVE_MOUNT_F_EMPTY_PATH), f"move_mount {source} to {target}")
    finally:
        os.close(tree)


def write_maps(pid: int, maps: IdMaps) -> None:
    """Give the user namespace of `pid` (just unshared, still unmapped) its mappings."""
    with open(f"/proc/{pid}/uid_map", "w") as f:  # procfs
        f.write(maps.uid_map())
    with open(f"/proc/{pid}/gid_map", "w") as f:  # procfs
        f.write(maps.gid_map())
