"""The database schema, as an ordered list of migrations.

Schema version N is reached by applying MIGRATIONS[1..N] in order; a released migration is never
edited, only followed by a new one. Records are JSON documents (plus the CRI config as protobuf
bytes), so most changes to what a record holds need no migration at all.
"""

from __future__ import annotations

# "CRIS" in ASCII: marks the file as ours, so a foreign sqlite file is refused, not migrated.
APPLICATION_ID = 0x43524953

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE pods (
               id TEXT PRIMARY KEY,
               config BLOB NOT NULL,
               record TEXT NOT NULL)""",
        """CREATE TABLE containers (
               id TEXT PRIMARY KEY,
               pod_id TEXT NOT NULL,
               config BLOB NOT NULL,
               record TEXT NOT NULL)""",
        "CREATE INDEX containers_by_pod ON containers(pod_id)",
        """CREATE TABLE images (
               id TEXT PRIMARY KEY,
               record TEXT NOT NULL)""",
        """CREATE TABLE settings (
               key TEXT PRIMARY KEY,
               value TEXT NOT NULL)""",
    ],
    # IRI machines (criserver/machine/store.py): each one its machine.v1alpha1.Machine protobuf.
    2: [
        """CREATE TABLE machines (
               id TEXT PRIMARY KEY,
               created_at INTEGER NOT NULL,
               machine BLOB NOT NULL)""",
    ],
}

SCHEMA_VERSION = max(MIGRATIONS)
