"""Lookup helpers shared by the stores: unique names and ID-prefix resolution."""

from __future__ import annotations

import bisect

from criserver.errors import AlreadyExists, InvalidArgument, NotFound


class IdIndex:
    """Sorted IDs, so a unique prefix (as crictl users type) resolves in O(log n)."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._ids: list[str] = []

    def add(self, id_: str) -> None:
        i = bisect.bisect_left(self._ids, id_)
        if i == len(self._ids) or self._ids[i] != id_:
            self._ids.insert(i, id_)

    def remove(self, id_: str) -> None:
        i = bisect.bisect_left(self._ids, id_)
        if i < len(self._ids) and self._ids[i] == id_:
            del self._ids[i]

    def resolve(self, prefix: str) -> str:
        """The one ID starting with `prefix`.

        :raises InvalidArgument: empty or ambiguous prefix.
        :raises NotFound: nothing matches.
        """
        if not prefix:
            raise InvalidArgument(f"{self._kind} ID must not be empty")
        i = bisect.bisect_left(self._ids, prefix)
        if i == len(self._ids) or not self._ids[i].startswith(prefix):
            raise NotFound(f"{self._kind} {prefix!r} not found")
        if i + 1 < len(self._ids) and self._ids[i + 1].startswith(prefix):
            raise InvalidArgument(f"{self._kind} ID prefix {prefix!r} is ambiguous")
        return self._ids[i]


class NameRegistry:
    """Names reserved by live objects: the same name is refused while its owner exists."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._owners: dict[str, str] = {}

    def reserve(self, name: str, owner: str) -> None:
        """:raises AlreadyExists: the name belongs to another object."""
        current = self._owners.setdefault(name, owner)
        if current != owner:
            raise AlreadyExists(f"{self._kind} name {name!r} is reserved by {current}")

    def release(self, name: str, owner: str) -> None:
        if self._owners.get(name) == owner:
            del self._owners[name]
