"""The embedded database: one sqlite file in WAL mode under the daemon's --root.

All sqlite work runs on one dedicated thread, so the event loop never blocks on disk and
sqlite's connection is only ever used from the thread that created it. Stores keep their
records in memory and write through; the database is read in full only at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from criserver.errors import Unavailable
from criserver.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from criserver.trace import span

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(Exception):
    """The database cannot be used as it is: corrupt, foreign, or from a newer criserver."""


class StoreUnavailable(Unavailable):
    """A change could not be written (the file read-only, its disk full or failing): nothing
    of it was kept, and the same call works once the database takes writes again."""


class Database:
    """An open criserver database. Use `await Database.open(path)`."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self.path = path
        self._executor = executor
        self._conn = conn

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating or migrating) the database at `path`.

        :raises StoreError: the file is corrupt, not ours, or has a newer schema. It is never
            wiped: an operator decides what to do with it.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="criserver-db")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the database thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._conn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in one transaction on the database thread: all of it lands or none."""
        loop = asyncio.get_running_loop()
        with span("db_write"):
            try:
                return await loop.run_in_executor(self._executor, _in_transaction, self._conn,
                                                  fn)
            except sqlite3.OperationalError as exc:  # SQLITE_IOERR, _READONLY, _FULL, _BUSY...
                log.error("database write failed path=%s error=%s", self.path, exc)
                raise StoreUnavailable(
                    f"the daemon's store {self.path} cannot be written ({exc}): the change was "
                    "not made; retry once the file is writable") from exc

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # sqlite has rolled back already after some errors (an I/O error in COMMIT): a second
        # ROLLBACK would fail and hide the error that matters.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


# The records hold every container's config, environment variables (often secrets) included:
# readable by root only, whatever the umask. sqlite gives the -wal and -shm files the mode of
# the database file.
FILE_MODE = 0o600


def _connect(path: Path) -> sqlite3.Connection:
    existed = path.exists() and path.stat().st_size > 0
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:  # made by an older criserver, or another umask
                file.chmod(FILE_MODE)
    # isolation_level=None: transactions are explicit (see _in_transaction).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        _check_and_migrate(conn, path, existed)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_and_migrate(conn: sqlite3.Connection, path: Path, existed: bool) -> None:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if existed:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StoreError(f"{path}: database is corrupt: {'; '.join(problems[:5])}")
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a usable sqlite database: {exc}") from exc

    if existed and app_id != APPLICATION_ID:
        raise StoreError(f"{path}: not a criserver database (application_id={app_id:#x})")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version} is newer than this criserver supports "
            f"({SCHEMA_VERSION}); run a newer criserver or restore a backup"
        )
    # FULL: a commit that returned survives a power cut, not only a daemon crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        log.info("migrating database path=%s from=%d to=%d", path, target - 1, target)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={target}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
