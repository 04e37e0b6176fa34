"""The machine store: whole Machine protobufs in the daemon's database, kept across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.errors import NotFound
from criserver.machine.store import MachineStore
from criserver.store.db import Database


def machine(machine_id: str, created_at: int = 1, **labels: str) -> iri.Machine:
    m = iri.Machine()
    m.metadata.id = machine_id
    m.metadata.created_at = created_at
    m.metadata.generation = 1
    m.metadata.labels.update(labels)
    setattr(m.spec, "class", "small")
    m.spec.volumes.add(name="root", device="oda").local_disk.size_bytes = 1 << 30
    return m


async def opened(path: Path) -> tuple[Database, MachineStore]:
    db = await Database.open(path)
    store = MachineStore(db)
    await store.load()
    return db, store


async def test_machines_survive_a_restart(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    await store.add(machine("b", created_at=2, app="web"))
    await store.add(machine("a", created_at=1))
    await store.update_status("b", lambda m: setattr(m.status, "state", iri.MACHINE_RUNNING))
    await store.add(machine("gone", created_at=3))
    await store.remove("gone")
    await db.close()

    db, store = await opened(tmp_path / "db")
    try:
        assert store.ids() == ["a", "b"]  # oldest first
        b = store.require("b")
        assert b.metadata.labels == {"app": "web"}
        assert b.status.state == iri.MACHINE_RUNNING
        assert b.spec.volumes[0].local_disk.size_bytes == 1 << 30
        assert store.get("gone") is None
    finally:
        await db.close()


async def test_a_spec_change_bumps_the_generation_and_nothing_else_does(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        await store.add(machine("m"))
        power_off = await store.update("m", lambda m: setattr(m.spec, "power", iri.POWER_OFF))
        assert power_off.metadata.generation == 2
        again = await store.update("m", lambda m: setattr(m.spec, "power", iri.POWER_OFF))
        assert again.metadata.generation == 2
        annotated = await store.update("m", lambda m: m.metadata.annotations.update(k="v"))
        assert annotated.metadata.generation == 2
        assert annotated.metadata.annotations == {"k": "v"}
        await store.update_status(
            "m", lambda m: setattr(m.status, "observed_generation", m.metadata.generation))
        status = store.require("m")
        assert status.metadata.generation == 2
        assert status.status.observed_generation == 2
    finally:
        await db.close()


async def test_update_keeps_status_and_update_status_keeps_the_rest(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        await store.add(machine("m"))
        await store.update_status("m", lambda m: setattr(m.status, "state", iri.MACHINE_RUNNING))

        def both(m: iri.Machine) -> None:
            m.spec.power = iri.POWER_OFF
            m.status.state = iri.MACHINE_TERMINATED  # not the RPCs' to write

        assert (await store.update("m", both)).status.state == iri.MACHINE_RUNNING

        def spec_too(m: iri.Machine) -> None:
            m.status.state = iri.MACHINE_STOPPED
            m.spec.power = iri.POWER_ON  # not the reconciler's to write
            m.metadata.generation = 99

        await store.update_status("m", spec_too)
        stopped = store.require("m")
        assert stopped.status.state == iri.MACHINE_STOPPED
        assert (stopped.spec.power, stopped.metadata.generation) == (iri.POWER_OFF, 2)
        terminating = await store.update(
            "m", lambda m: None, status=lambda s: setattr(s, "state", iri.MACHINE_TERMINATING))
        assert terminating.status.state == iri.MACHINE_TERMINATING
    finally:
        await db.close()


async def test_a_refused_change_writes_nothing(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        await store.add(machine("m"))

        def refuse(m: iri.Machine) -> None:
            m.spec.power = iri.POWER_OFF
            raise NotFound("no")

        with pytest.raises(NotFound):
            await store.update("m", refuse)
        assert store.require("m").spec.power == iri.POWER_ON
    finally:
        await db.close()


async def test_callers_get_copies(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        added = await store.add(machine("m"))
        added.spec.power = iri.POWER_OFF
        store.require("m").metadata.labels["x"] = "y"
        store.list()[0].status.state = iri.MACHINE_RUNNING
        assert store.get("m") == machine("m")
    finally:
        await db.close()


async def test_unknown_ids(tmp_path: Path) -> None:
    db, store = await opened(tmp_path / "db")
    try:
        assert store.get("nope") is None
        with pytest.raises(NotFound):
            store.require("nope")
        with pytest.raises(NotFound):
            await store.update("nope", lambda m: None)
        with pytest.raises(NotFound):
            await store.update_status("nope", lambda m: None)
        await store.remove("nope")
    finally:
        await db.close()


async def test_a_schema_1_database_gains_the_machines_table(tmp_path: Path) -> None:
    import sqlite3

    from criserver.store.schema import APPLICATION_ID, MIGRATIONS

    path = tmp_path / "db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    db, store = await opened(path)
    try:
        await store.add(machine("m"))
        assert store.ids() == ["m"]
    finally:
        await db.close()
