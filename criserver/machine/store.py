"""IRI machines' desired state and observed status, durable in the daemon's database.

Each machine is kept whole as its machine.v1alpha1.Machine protobuf (metadata, spec, status), in
memory after `load` and written through: a change is persisted before memory shows it. Two
writers, two methods: the RPCs change metadata and spec through `update` (which bumps the
generation when the spec changed), the reconciler changes status through `update_status` (which
can change nothing else). Callers always get copies: a message they hold never changes under them,
and changing it changes nothing stored.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
from collections.abc import Callable

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.errors import NotFound
from criserver.store.db import Database


def _copy(machine: iri.Machine) -> iri.Machine:
    out = iri.Machine()
    out.CopyFrom(machine)
    return out


def _spec_bytes(machine: iri.Machine) -> bytes:
    return machine.spec.SerializeToString(deterministic=True)


class MachineStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._machines: dict[str, iri.Machine] = {}
        # Changes are read-modify-write across an await (the database write): one at a time, so
        # an RPC and the reconciler never overwrite each other's change.
        self._writing = asyncio.Lock()

    async def load(self) -> None:
        rows = await self._db.read(
            lambda c: c.execute("SELECT machine FROM machines ORDER BY created_at, id").fetchall()
        )
        for (blob,) in rows:
            machine = iri.Machine.FromString(blob)
            self._machines[machine.metadata.id] = machine

    def __len__(self) -> int:
        return len(self._machines)

    def __contains__(self, machine_id: object) -> bool:
        return machine_id in self._machines

    def get(self, machine_id: str) -> iri.Machine | None:
        """The machine, or None: no machine has this id (or it was removed)."""
        machine = self._machines.get(machine_id)
        return None if machine is None else _copy(machine)

    def require(self, machine_id: str) -> iri.Machine:
        """:raises NotFound: no machine has this id (or it was removed)."""
        return _copy(self._current(machine_id))

    def list(self) -> list[iri.Machine]:
        """Every machine, deleting ones included, oldest first."""
        return [_copy(m) for m in self._machines.values()]

    def ids(self) -> builtins.list[str]:
        return list(self._machines)

    async def add(self, machine: iri.Machine) -> iri.Machine:
        """Persist a new machine (its id, created_at and generation already set)."""
        stored = _copy(machine)
        async with self._writing:
            if stored.metadata.id in self._machines:
                raise ValueError(f"machine {stored.metadata.id} exists already")
            await self._write(stored)
            self._machines[stored.metadata.id] = stored
        return _copy(stored)

    async def update(
        self, machine_id: str, change: Callable[[iri.Machine], None],
        status: Callable[[iri.MachineStatus], None] | None = None,
    ) -> iri.Machine:
        """Apply `change` to a copy of the machine (metadata and spec; what it does to status is
        discarded), bump metadata.generation if the spec changed, persist, swap in. `change` may
        raise to refuse: nothing is written. `status`, if given, changes the status in the same
        write (the service uses it once: Delete's TERMINATING).

        :raises NotFound: no such machine.
        """
        async with self._writing:
            old = self._current(machine_id)
            new = _copy(old)
            change(new)
            new.status.CopyFrom(old.status)
            if status is not None:
                status(new.status)
            new.metadata.id = old.metadata.id
            if _spec_bytes(new) != _spec_bytes(old):
                new.metadata.generation = old.metadata.generation + 1
            if new == old:
                return _copy(old)
            await self._write(new)
            self._machines[machine_id] = new
            return _copy(new)

    async def update_status(
        self, machine_id: str, update: Callable[[iri.Machine], None]
    ) -> None:
        """Apply `update` to a copy of the current machine and keep only its status: metadata
        and spec stay as they are (the generation too: status is not spec). `update` sees the
        current spec and generation, which may be newer than what the caller last read.

        :raises NotFound: no such machine.
        """
        async with self._writing:
            old = self._current(machine_id)
            scratch = _copy(old)
            update(scratch)
            if scratch.status == old.status:
                return
            new = _copy(old)
            new.status.CopyFrom(scratch.status)
            await self._write(new)
            self._machines[machine_id] = new

    async def remove(self, machine_id: str) -> None:
        """Forget the machine: its resources are released. Removing an unknown id is a no-op."""
        async with self._writing:
            await self._db.write(
                lambda c: c.execute("DELETE FROM machines WHERE id = ?", (machine_id,))
            )
            self._machines.pop(machine_id, None)

    def _current(self, machine_id: str) -> iri.Machine:
        machine = self._machines.get(machine_id)
        if machine is None:
            raise NotFound(f"machine {machine_id} not found")
        return machine

    async def _write(self, machine: iri.Machine) -> None:
        row = (machine.metadata.id, machine.metadata.created_at, machine.SerializeToString())

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO machines VALUES (?, ?, ?)", row)

        await self._db.write(insert)
