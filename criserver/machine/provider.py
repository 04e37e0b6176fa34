"""The machine provider as the daemon runs it: store, events, classes, the reconciler with its
QEMU driver and volumes, the console broker and the service, built from the [machine] config
over the daemon's database, image service and VM host, and closed in reverse at shutdown.

The VM host is the one the micro-VM pods use when both are configured alike (same QEMU, same
accelerator): one KVM probe, one set of host facts. Machines' VMs outlive the daemon; the next
start re-adopts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from criserver.config import Config
from criserver.image.service import ImageService
from criserver.machine.classes import MachineClasses
from criserver.machine.console import ConsoleBroker
from criserver.machine.driver import DriverSettings, MachineDriver, check_state_dir
from criserver.machine.events import EventStore
from criserver.machine.reconciler import Reconciler, ReconcileSettings
from criserver.machine.service import MachineService
from criserver.machine.store import MachineStore
from criserver.machine.volumes import MachineVolumes
from criserver.runtime.backend import DaemonShared
from criserver.runtime.streaming.lazy import LazyStreaming
from criserver.store.db import Database
from criserver.vm import assets
from criserver.vm.host import shared_host


@dataclass(frozen=True)
class MachineProvider:
    root: Path
    state: Path
    store: MachineStore
    events: EventStore
    classes: MachineClasses
    driver: MachineDriver
    reconciler: Reconciler
    service: MachineService


def machine_dirs(config: Config) -> tuple[Path, Path]:
    """[machine] root and state, defaulting to a `machines` directory under the daemon's."""
    machine = config.machine
    root = Path(machine.root) if machine.root else Path(config.daemon.root) / "machines"
    state = Path(machine.state) if machine.state else Path(config.daemon.state) / "machines"
    return root, state


@asynccontextmanager
async def machine_provider(config: Config, db: Database, images: ImageService,
                           shared: DaemonShared, streaming: LazyStreaming
                           ) -> AsyncIterator[MachineProvider]:
    root, state = machine_dirs(config)
    check_state_dir(state)
    for directory in (root, state):
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    store = MachineStore(db)
    await store.load()
    events = EventStore()
    classes = MachineClasses(config.machine.classes)
    # The pods' VM host when the micro-VM handler is configured alike (no KSM switch here).
    host = shared_host(shared, Path(config.daemon.state), qemu_binary=config.machine.qemu_binary,
                       accelerator=config.machine.accelerator,
                       assets_dir=assets.DEFAULT_ASSETS_DIR, enable_ksm=False)
    await host.start()

    def vm_exited(machine_id: str, guest_powered_off: bool) -> None:
        reconciler.vm_exited(machine_id, guest_powered_off)

    driver = MachineDriver(host, DriverSettings(state, qemu_binary=config.machine.qemu_binary),
                           vm_exited)
    volumes = MachineVolumes(images, events, root / "disks", root / "bases",
                             config.machine.connection_dirs)
    reconciler = Reconciler(store, events, driver, volumes, classes,
                            ReconcileSettings(delete_grace=config.machine.delete_grace_seconds))
    console = ConsoleBroker(
        streaming.server,
        lambda machine_id: driver.console_socket(machine_id) if driver.running(machine_id)
        else None)
    service = MachineService(store, events, classes, reconciler, console, config.machine)
    await volumes.prune()
    await reconciler.start()
    try:
        yield MachineProvider(root, state, store, events, classes, driver, reconciler, service)
    finally:
        await reconciler.close()
        await driver.close()  # machines keep running: the next start adopts them
        await host.close()
