"""VM templates: boot a guest once per VM shape, save it, and start later pods of that shape
by restoring the save instead of booting.

A template is a guest booted up to a ready agent, then paused and saved: its RAM stays in a file
on tmpfs (`memory`), its device state (~70 KB) goes next to it (`state`). A clone's QEMU maps the
memory file privately and loads the state: it runs in ~0.1 s instead of a ~4 s boot under TCG,
and every page it does not write stays one page of the host's page cache, shared by all clones
(no KSM scanning needed). Its translation cache also starts empty instead of full of boot code.

A clone must have the template's devices, so the template is keyed by the VM's whole QEMU
command line with the per-VM parts (ids, sockets, share paths, tap fds, MACs) normalised out.
What the clone gets of its own once restored (clock, RNG, MAC, hostname) its owner gives it
(the pod guest's agent: SetupSandbox). The store knows no guest: its owner says how a template
boots (`TemplateGuest.template_spec`) and when it is ready to be saved (`wait_ready`).
QEMU 7.2 cannot keep free page reporting in a clone: it would punch the freed
page out of the template file under every clone (see qemu._check), so templates go without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from criserver.errors import CriError
from criserver.failpoints import crash_point
from criserver.vm import process
from criserver.vm.host import qemu_identity
from criserver.vm.qemu import (
    GuestMemory,
    SerialTransport,
    TapNic,
    VMSpec,
    VsockTransport,
    build_command,
)
from criserver.vm.vm import VM

log = logging.getLogger(__name__)

# Every template NIC and so every clone's guest device carries this MAC until the agent sets the
# pod's own (locally administered; each clone sits on its own tap).
TEMPLATE_MAC = "02:c5:00:00:00:01"
# A vsock CID for template VMs while they boot (clones get their own; the restored guest
# re-reads it on the transport reset QEMU sends after loading).
TEMPLATE_CID = 0x7FFF_FFF0
_PLACEHOLDER = Path("/template")

# Opens `count` tap NICs for a template VM in a scratch netns; closing removes them.
ScratchNics = Callable[[str, int], AbstractAsyncContextManager[tuple[TapNic, ...]]]


class TemplateGuest(Protocol):
    """What the store needs from the guest it saves."""

    def template_spec(self, spec: VMSpec) -> VMSpec:
        """`spec` as the guest boots to become a template."""

    async def wait_ready(self, spec: VMSpec, deadline: float) -> None:
        """Return once the booted guest is ready to be saved (monotonic `deadline`)."""


@dataclass(frozen=True)
class Template:
    directory: Path

    @property
    def memory(self) -> Path:
        return self.directory / "memory"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def clone_spec(self, spec: VMSpec) -> VMSpec:
        """`spec` as a clone of this template: restored, with the template's guest MAC."""
        return dataclasses.replace(
            spec,
            memory_file=GuestMemory(self.memory, shared=False),
            incoming=True,
            free_page_reporting=False,
            nics=tuple(dataclasses.replace(nic, mac=TEMPLATE_MAC) for nic in spec.nics),
        )


def shape_of(spec: VMSpec, state_dir: Path = _PLACEHOLDER) -> VMSpec:
    """The parts of `spec` a clone shares with its template (what the guest was booted with and
    which devices it has); per-pod values replaced by fixed ones, the state dir by `state_dir`."""
    transport = spec.transport
    if isinstance(transport, VsockTransport):
        transport = VsockTransport(TEMPLATE_CID)
    elif isinstance(transport, SerialTransport):
        transport = dataclasses.replace(transport, socket_path=state_dir / "agent.sock")
    return dataclasses.replace(
        spec,
        vm_id="template",
        state_dir=state_dir,
        transport=transport,
        nics=tuple(TapNic(-1, TEMPLATE_MAC, nic.mtu) for nic in spec.nics),
        shares=tuple(dataclasses.replace(s, path=_PLACEHOLDER / s.tag) for s in spec.shares),
        free_page_reporting=False,
        memory_file=None,
        incoming=False,
    )


def template_key(spec: VMSpec) -> str:
    """Names the template `spec` can be cloned from. The guest assets' paths carry their
    digest; QEMU's binary is identified by size and mtime (a new QEMU may save other state)."""
    shape = shape_of(spec)
    blob = json.dumps([build_command(shape), qemu_identity(shape.qemu_binary)]).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class TemplateStore:
    """Ready templates under `root` (a tmpfs directory: the memory files are guest RAM), built
    one at a time in the background when a pod of a new shape asks."""

    def __init__(self, root: Path, guest: TemplateGuest, scratch_nics: ScratchNics,
                 boot_timeout: float = 120.0, max_templates: int = 4) -> None:
        self.root = root
        self._guest = guest
        self._scratch_nics = scratch_nics
        self._boot_timeout = boot_timeout
        self._max_templates = max_templates
        self._building: dict[str, asyncio.Task[None]] = {}
        self._failed: set[str] = set()
        self._lock = asyncio.Lock()  # one build at a time: each is a full boot

    def ready(self, spec: VMSpec) -> Template | None:
        """The template to clone `spec` from, if one is built. Blocking (a touch: the least
        recently used template is the one evicted)."""
        template = Template(self.root / template_key(spec))
        now = time.time_ns()  # not the file system's coarse clock: order matters here
        try:
            os.utime(template.state, ns=(now, now))
        except FileNotFoundError:
            return None
        return template

    def discard(self, template: Template) -> None:
        """Remove a template that failed to restore (blocking); it is not built again."""
        log.warning("template discarded key=%s", template.directory.name)
        self._failed.add(template.directory.name)
        shutil.rmtree(template.directory, ignore_errors=True)

    def prune(self) -> None:
        """Remove what a build cut short by a daemon crash left: its QEMU (daemonized, so it
        outlived the daemon) and its directory. Blocking: call from a thread at start."""
        for entry in self._entries():
            # A build's directory is <key>.tmp until published: it may hold a state file
            # already (the crash came after the save), and its QEMU may still run.
            unfinished = entry.name.endswith(".tmp") or not (entry / "state").exists()
            if unfinished and _kill_template_qemu(entry):
                shutil.rmtree(entry, ignore_errors=True)

    def ensure(self, spec: VMSpec) -> None:
        """Start building the template for `spec`'s shape unless it exists, is being built or
        failed before. Beyond `max_templates`, the least recently used one goes (its running
        clones keep their mapping of its memory)."""
        key = template_key(spec)
        if key in self._building or key in self._failed or (self.root / key).exists():
            return
        task = asyncio.create_task(self._build_logged(spec, key), name=f"template {key}")
        self._building[key] = task
        task.add_done_callback(lambda _: self._building.pop(key, None))

    async def wait_built(self) -> None:
        """Wait for the builds in progress (tests and benchmarks)."""
        while self._building:
            await asyncio.gather(*self._building.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._building.values()):
            task.cancel()
        await asyncio.gather(*self._building.values(), return_exceptions=True)

    def _entries(self) -> list[Path]:
        try:
            return list(self.root.iterdir())
        except FileNotFoundError:
            return []

    def _evict(self) -> None:
        built = [p for p in self._entries() if (p / "state").exists()]
        built.sort(key=lambda p: (p / "state").stat().st_mtime)
        for old in built[:max(0, len(built) - self._max_templates + 1)]:
            log.info("template evicted key=%s", old.name)
            shutil.rmtree(old, ignore_errors=True)

    async def _build_logged(self, spec: VMSpec, key: str) -> None:
        t0 = time.monotonic()
        try:
            async with self._lock:
                await asyncio.to_thread(self._evict)
                await self.build(spec, key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the pods that asked already booted without it
            self._failed.add(key)
            message = exc.message if isinstance(exc, CriError) else repr(exc)
            log.warning("template build failed key=%s: %s", key, message)
            return
        log.info("template built key=%s seconds=%.1f", key, time.monotonic() - t0)

    async def build(self, spec: VMSpec, key: str) -> Template:
        """Boot `spec`'s shape, wait for its agent, save it as template `key` (atomically: a
        template directory either has its state file or is not there)."""
        final = Template(self.root / key)
        work = self.root / f"{key}.tmp"
        await asyncio.to_thread(_fresh_dir, work)
        try:
            async with self._scratch_nics(key[:8], len(spec.nics)) as nics:
                shares = tuple(dataclasses.replace(s, path=work / f"share-{s.tag}")
                               for s in spec.shares)
                await asyncio.to_thread(_make_dirs, [s.path for s in shares])
                template_spec = self._guest.template_spec(dataclasses.replace(
                    shape_of(spec, work),
                    vm_id=f"template-{key[:12]}",
                    nics=nics,
                    shares=shares,
                    memory_file=GuestMemory(work / "memory", shared=True),
                ))
                await self._boot_and_save(template_spec, work / "state")
            await asyncio.to_thread(_publish, work, final.directory)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        return final


    async def _boot_and_save(self, spec: VMSpec, state: Path) -> None:
        vm = VM(spec)
        await vm.start()
        try:
            crash_point("template.booting")  # its QEMU daemonized, the directory a .tmp
            await self._guest.wait_ready(spec, time.monotonic() + self._boot_timeout)
            await vm.save_state(state)
            crash_point("template.saved")  # memory and state written, not yet published
        finally:
            with contextlib.suppress(CriError):
                await vm.kill()


def _kill_template_qemu(work: Path) -> bool:
    """Whether no QEMU of the build in `work` runs any more (its pidfile may then go)."""
    if process.kill_all(work / "qemu.pid"):
        log.warning("a QEMU of an unfinished template build survived SIGKILL dir=%s", work)
        return False
    return True


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _make_dirs(paths: list[Path]) -> None:
    for p in paths:
        p.mkdir()


def _publish(work: Path, final: Path) -> None:
    """Keep only what clones read, then move it in place under its key."""
    for entry in work.iterdir():
        if entry.name not in ("memory", "state"):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    work.rename(final)
