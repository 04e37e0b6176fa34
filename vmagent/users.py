"""User resolution for containers: turns an image/CRI user ("name", "uid:group", ...) into
numeric uid, gid and supplementary gids from the container rootfs's /etc/passwd and /etc/group.
Files are read with symlinks resolved inside the rootfs, never on the guest's own root.
"""

from __future__ import annotations

import os
import stat

from grpclib.const import Status
from grpclib.exceptions import GRPCError

_MAX_SYMLINKS = 40
_MAX_FILE = 4 * 1024 * 1024  # a passwd/group file larger than this is not a real one


class ResolvedUser:
    __slots__ = ("additional_gids", "gid", "home", "uid")

    def __init__(self, uid: int, gid: int, additional_gids: list[int], home: str) -> None:
        self.uid = uid
        self.gid = gid
        self.additional_gids = additional_gids
        self.home = home

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResolvedUser) and (
            self.uid, self.gid, self.additional_gids, self.home) == (
            other.uid, other.gid, other.additional_gids, other.home)

    def __repr__(self) -> str:
        return (f"ResolvedUser(uid={self.uid}, gid={self.gid}, "
                f"additional_gids={self.additional_gids}, home={self.home!r})")


def resolve_in_root(root: str, path: str) -> str | None:
    """The real path of `path` as seen from inside `root`: symlinks (absolute ones included)
    and ".." resolve within root, never above it. None if it does not exist (or loops).
    Blocking: call from a thread."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, name)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(name)
    return os.path.join(root, *resolved)


def read_in_root(root: str, path: str) -> str | None:
    """Content of regular file `path` as seen from inside `root` (see `resolve_in_root`), or
    None if it does not exist. Blocking: call from a thread."""
    full = resolve_in_root(root, path)
    if full is None:
        return None
    try:
        if not stat.S_ISREG(os.stat(full).st_mode):
            return None
        with open(full, "rb") as f:
            return f.read(_MAX_FILE).decode(errors="replace")
    except FileNotFoundError:
        return None


def _parse(content: str | None, fields: int) -> list[list[str]]:
    rows = []
    for line in (content or "").splitlines():
        if not line or line.startswith("#"):
            continue
        cols = line.split(":")
        if len(cols) >= fields:
            rows.append(cols)
    return rows


def resolve_user(spec_user: str, passwd: str | None, group: str | None,
                 extra_gids: list[int] | None = None,
                 image_groups: bool = True) -> ResolvedUser:
    """Resolve "user[:group]" the way container runtimes do: a numeric part is used as is (a
    numeric uid still picks its primary gid and home from passwd when listed there), a name
    must exist. Supplementary gids: the primary gid, the groups that list the user by name
    (unless not `image_groups`: CRI SupplementalGroupsPolicy Strict), then `extra_gids` (CRI
    supplemental groups), without duplicates.

    :raises GRPCError: INVALID_ARGUMENT for an unknown user or group name or a bad format.
    """
    user_part, _, group_part = spec_user.partition(":")
    if not user_part:
        raise GRPCError(Status.INVALID_ARGUMENT, f"bad user {spec_user!r}")
    users = _parse(passwd, 7)
    groups = _parse(group, 4)
    entry: list[str] | None = None
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((u for u in users if u[2] == user_part), None)
    else:
        entry = next((u for u in users if u[0] == user_part), None)
        if entry is None:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"user {user_part!r} not found in the image's /etc/passwd")
        uid = int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    home = entry[5] if entry is not None else "/"
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            g = next((g for g in groups if g[0] == group_part), None)
            if g is None:
                raise GRPCError(Status.INVALID_ARGUMENT,
                                f"group {group_part!r} not found in the image's /etc/group")
            gid = int(g[2])
    gids = [gid]
    if entry is not None and image_groups:
        for g in groups:
            members = [m for m in g[3].split(",") if m]
            if entry[0] in members and g[2].isdigit():
                gids.append(int(g[2]))
    gids.extend(extra_gids or [])
    seen: set[int] = set()
    unique = [g for g in gids if not (g in seen or seen.add(g))]  # type: ignore[func-returns-value]
    return ResolvedUser(uid, gid, unique, home or "/")


def resolve_in_rootfs(spec_user: str, rootfs: str, extra_gids: list[int] | None = None,
                      image_groups: bool = True) -> ResolvedUser:
    """resolve_user with the rootfs's own files. Blocking: call from a thread."""
    return resolve_user(spec_user, read_in_root(rootfs, "/etc/passwd"),
                        read_in_root(rootfs, "/etc/group"), extra_gids, image_groups)
