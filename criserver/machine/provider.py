"""The machine provider as the daemon runs it: its store, events, classes and service, built
from the [machine] config over the daemon's database, and closed in reverse at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from criserver.config import Config
from criserver.machine.classes import MachineClasses
from criserver.machine.events import EventStore
from criserver.machine.placeholders import NoConsole, StoreOnlyReconciler
from criserver.machine.service import MachineService
from criserver.machine.store import MachineStore
from criserver.store.db import Database


@dataclass(frozen=True)
class MachineProvider:
    root: Path
    state: Path
    store: MachineStore
    events: EventStore
    classes: MachineClasses
    service: MachineService


def machine_dirs(config: Config) -> tuple[Path, Path]:
    """[machine] root and state, defaulting to a `machines` directory under the daemon's."""
    machine = config.machine
    root = Path(machine.root) if machine.root else Path(config.daemon.root) / "machines"
    state = Path(machine.state) if machine.state else Path(config.daemon.state) / "machines"
    return root, state


@asynccontextmanager
async def machine_provider(config: Config, db: Database) -> AsyncIterator[MachineProvider]:
    root, state = machine_dirs(config)
    for directory in (root, state):
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    store = MachineStore(db)
    await store.load()
    events = EventStore()
    classes = MachineClasses(config.machine.classes)
    # Until the reconciler and the console are wired in, machines are stored and listed only.
    reconciler, console = StoreOnlyReconciler(), NoConsole()
    service = MachineService(store, events, classes, reconciler, console, config.machine)
    yield MachineProvider(root, state, store, events, classes, service)
