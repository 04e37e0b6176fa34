"""The pod and container stores: in-memory records, written through to the database.

Each store is the only writer of its records' state. `update` validates the transition, persists
the new record, then swaps it in, so memory never shows a state the database does not hold.
List responses are served from cached wire encodings of each record, which keeps ListContainers
cheap with thousands of containers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from criserver.errors import FailedPrecondition, NotFound
from criserver.store.db import Database
from criserver.store.index import IdIndex, NameRegistry
from criserver.store.records import (
    CONTAINER_TRANSITIONS,
    POD_TRANSITIONS,
    ContainerRecord,
    PodRecord,
)

R = TypeVar("R", PodRecord, ContainerRecord)


def _encode_list_item(message_bytes: bytes) -> bytes:
    """Field 1 (length-delimited) of a List*/Stream* response: the repeated item field."""
    n = len(message_bytes)
    out = bytearray(b"\x0a")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + message_bytes


class _Store(Generic[R]):
    kind = ""
    table = ""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._records: dict[str, R] = {}
        self._wire: dict[str, bytes] = {}
        # The unfiltered list response, kept until any record changes: kubelet relists every
        # second and records change far less often.
        self._all_wire: bytes | None = None
        self.ids = IdIndex(self.kind)
        self.names = NameRegistry(self.kind)
        # Changes are read-modify-write across an await (the database write): one at a time, so
        # two causes of one change (a stop and an exit report) never both apply it.
        self._writing = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, id_or_prefix: str) -> R:
        """:raises NotFound, InvalidArgument: see IdIndex.resolve."""
        return self._records[self.ids.resolve(id_or_prefix)]

    def find(self, id_: str) -> R | None:
        return self._records.get(id_)

    def all(self) -> Iterator[R]:
        return iter(list(self._records.values()))

    def list_item_bytes(self, record: R) -> bytes:
        """`record` encoded as one element of the List* response's repeated field 1."""
        wire = self._wire.get(record.id)
        if wire is None:
            wire = _encode_list_item(record.to_cri().SerializeToString())
            self._wire[record.id] = wire
        return wire

    def all_list_bytes(self, visible: Callable[[R], bool]) -> bytes:
        """The List* response of every visible record (`visible` must not change over time
        for an unchanged record)."""
        if self._all_wire is None:
            self._all_wire = b"".join(
                self.list_item_bytes(r) for r in self._records.values() if visible(r)
            )
        return self._all_wire

    async def add(self, record: R) -> None:
        """Persist and index a new record (its name must have been reserved by the caller)."""
        row = record.to_row()
        async with self._writing:
            await self._db.write(lambda c: self._insert(c, row))
            self._put(record)

    async def update(self, id_: str, change: Callable[[R], R]) -> R:
        """Apply `change` to the current record, check the state transition, persist, swap in.
        `change` may return the record it was given: nothing to do, nothing is written.

        :raises FailedPrecondition: the transition is not allowed.
        :raises NotFound: the record was deleted meanwhile.
        """
        async with self._writing:
            old = self._records.get(id_)
            if old is None:
                raise NotFound(f"{self.kind} {id_} not found")
            new = change(old)
            if new is old:
                return old
            if new.state != old.state and new.state not in self._transitions()[old.state]:
                raise FailedPrecondition(
                    f"{self.kind} {id_} cannot go from {old.state} to {new.state}"
                )
            row = new.to_row()
            await self._db.write(lambda c: self._insert(c, row))
            self._put(new)
            return new

    async def delete(self, id_: str) -> None:
        async with self._writing:
            await self._db.write(
                lambda c: c.execute(f"DELETE FROM {self.table} WHERE id = ?", (id_,))
            )
            self._records.pop(id_, None)
            self._wire.pop(id_, None)
            self._all_wire = None
            self.ids.remove(id_)

    def _put(self, record: R) -> None:
        self._records[record.id] = record
        self._wire.pop(record.id, None)
        self._all_wire = None
        self.ids.add(record.id)

    def _insert(self, conn: sqlite3.Connection, row: tuple[object, ...]) -> None:
        marks = ", ".join("?" * len(row))
        conn.execute(f"INSERT OR REPLACE INTO {self.table} VALUES ({marks})", row)

    def _transitions(self) -> dict[object, set[object]]:
        raise NotImplementedError


class PodStore(_Store[PodRecord]):
    kind = "pod sandbox"
    table = "pods"

    async def load(self) -> None:
        rows = await self._db.read(lambda c: c.execute("SELECT * FROM pods").fetchall())
        for row in rows:
            record = PodRecord.from_row(*row)
            self._put(record)
            self.names.reserve(record.name_key, record.id)

    def _transitions(self) -> dict[object, set[object]]:
        return POD_TRANSITIONS  # type: ignore[return-value]


class ContainerStore(_Store[ContainerRecord]):
    kind = "container"
    table = "containers"

    async def load(self, pods: PodStore) -> None:
        rows = await self._db.read(lambda c: c.execute("SELECT * FROM containers").fetchall())
        for row in rows:
            record = ContainerRecord.from_row(*row)
            self._put(record)
            pod = pods.find(record.pod_id)
            if pod is not None:
                self.names.reserve(record.name_key(pod), record.id)

    def of_pod(self, pod_id: str) -> list[ContainerRecord]:
        return [c for c in self._records.values() if c.pod_id == pod_id]

    def _transitions(self) -> dict[object, set[object]]:
        return CONTAINER_TRANSITIONS  # type: ignore[return-value]
