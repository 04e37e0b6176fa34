"""`criserver serve`: the daemon's life, top-down: start up, serve until signalled, shut down.

Start-up opens the store, loads the backends named by the runtime handlers (which re-adopt their
running sandboxes), then listens. SIGTERM/SIGINT stop accepting calls, let in-flight calls finish
within daemon.shutdown_timeout, and exit 0; micro-VMs keep running for the next start to adopt.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import grp
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from criserver import admin, instrument, sdnotify, trace
from criserver.api.admin.v1 import admin_pb2
from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri_machine
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import Config, ConfigError
from criserver.errors import CriError
from criserver.image import servicer as image_servicer
from criserver.image.service import ImageService
from criserver.machine import servicer as machine_servicer
from criserver.machine.provider import MachineProvider, machine_provider
from criserver.runtime import servicer as runtime_servicer
from criserver.runtime.backend import (
    BackendContext,
    SandboxBackend,
    load_backend_class,
)
from criserver.runtime.recovery import recover
from criserver.runtime.runtime import BackendEventSink, Runtime
from criserver.runtime.streaming.lazy import LazyStreaming
from criserver.store.db import Database

log = logging.getLogger("criserver.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def socket_path(listen: str, key: str = "daemon.listen") -> Path:
    if not listen.startswith("unix://"):
        raise ConfigError(f"{key}: only unix:// endpoints are supported, got {listen!r}")
    return Path(listen.removeprefix("unix://"))


async def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(_runtime(config))
        runtime.streaming = LazyStreaming(config.streaming)
        # Stopped before the backends close: it ends the sessions (and the exec'd processes).
        stack.push_async_callback(runtime.streaming.close)
        servers = [await _start_server(config, runtime)]
        if config.machine.enabled:
            assert runtime.images is not None
            try:
                provider = await stack.enter_async_context(machine_provider(
                    config, runtime.db, runtime.images, runtime.shared, runtime.streaming))
            except CriError as exc:
                raise StartupError(f"[machine]: {exc.message}") from exc
            servers.append(await _start_machine_server(config, provider))
            log.info("serving IRI MachineRuntime listen=%s machines=%d",
                     config.machine.listen, len(provider.store))
        # Everything loaded so far lives as long as the daemon: keep it out of the cyclic GC's
        # scans, which otherwise add millisecond pauses to calls once the store is large.
        gc.freeze()
        log.info("serving listen=%s root=%s state=%s pods=%d containers=%d",
                 config.daemon.listen, config.daemon.root, config.daemon.state,
                 len(runtime.pods), len(runtime.containers))
        sdnotify.notify("READY=1\nSTATUS=serving CRI")
        await stop.wait()
        log.info("shutting down grace_s=%.1f", config.daemon.shutdown_timeout)
        sdnotify.notify("STOPPING=1")
        await asyncio.gather(*(s.stop(config.daemon.shutdown_timeout) for s in servers))
    log.info("stopped")
    return 0


@asynccontextmanager
async def _runtime(config: Config) -> AsyncIterator[Runtime]:
    root, state = Path(config.daemon.root), Path(config.daemon.state)
    for directory in (root, state):
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    lock = _lock_state_dir(state)
    try:
        db = await Database.open(root / "criserver.db")
    except Exception as exc:
        lock.close()
        raise StartupError(str(exc)) from exc
    try:
        runtime = Runtime(config, db, backends={})
        await runtime.load()
        images = ImageService(config.image, root, db, in_use=runtime.image_in_use,
                              pinned_images=config.image.pinned_images)
        await images.start()
        runtime.images = images
        runtime.backends.update(_load_backends(config, runtime))
        for name, backend in runtime.backends.items():
            await recover(runtime, name, backend)
        try:
            yield runtime
        finally:
            for backend in runtime.backends.values():
                await backend.close()
            await images.close()
    finally:
        await db.close()
        lock.close()


def _lock_state_dir(state: Path) -> Any:
    lock = open(state / "daemon.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StartupError(f"another criserver daemon is running with state dir {state}") from None
    return lock


def _load_backends(config: Config, runtime: Runtime) -> dict[str, SandboxBackend]:
    backends: dict[str, SandboxBackend] = {}
    sink = BackendEventSink(runtime)
    for handler, handler_config in config.runtimes.items():
        try:
            cls = load_backend_class(handler_config.backend)
        except CriError as exc:
            raise StartupError(f"runtimes.{handler}.backend: {exc.message}") from exc
        context = BackendContext(
            handler=handler,
            root=Path(config.daemon.root) / "runtimes" / handler,
            state=Path(config.daemon.state) / "runtimes" / handler,
            config=config,
            events=sink,
            images=runtime.images,
            shared=runtime.shared,
        )
        context.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        context.state.mkdir(parents=True, exist_ok=True, mode=0o711)
        backend = cls(handler_config.options, context)
        if not isinstance(backend, SandboxBackend):
            raise StartupError(f"runtimes.{handler}.backend: {cls!r} is not a SandboxBackend")
        backends[handler] = backend
    return backends


async def _start_server(config: Config, runtime: Runtime) -> grpc.aio.Server:
    services = cri.DESCRIPTOR.services_by_name
    images = _images(runtime)
    return await _listen(config, socket_path(config.daemon.listen), [
        instrument.generic_handler(services["RuntimeService"],
                                   runtime_servicer.runtime_service(runtime),
                                   runtime_servicer.MISSING,
                                   trace.TRACED if config.daemon.trace else frozenset()),
        instrument.generic_handler(services["ImageService"],
                                   image_servicer.image_service(images, Path(config.daemon.root)),
                                   image_servicer.MISSING),
        instrument.generic_handler(admin_pb2.DESCRIPTOR.services_by_name["Images"],
                                   admin.images_service(images), admin.MISSING),
    ])


async def _start_machine_server(config: Config, provider: MachineProvider) -> grpc.aio.Server:
    service = iri_machine.DESCRIPTOR.services_by_name["MachineRuntime"]
    return await _listen(config, socket_path(config.machine.listen, "machine.listen"), [
        instrument.generic_handler(service,
                                   machine_servicer.machine_runtime_service(provider.service),
                                   machine_servicer.MISSING),
    ])


async def _listen(config: Config, path: Path,
                  handlers: list[grpc.GenericRpcHandler]) -> grpc.aio.Server:
    """A started gRPC server on the Unix socket `path`, with the daemon's message limits, socket
    mode and group."""
    _claim_socket(path)
    limit = config.daemon.max_message_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ])
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(f"unix:{path}")  # binds: the file exists, nobody is served yet
    # Mode and group before the first connection: under a lax umask the socket would take
    # calls from any local user (CRI is root's) until the chmod.
    os.chmod(path, 0o660)
    if config.daemon.socket_group:
        os.chown(path, 0, grp.getgrnam(config.daemon.socket_group).gr_gid)
    await server.start()
    return server


def _claim_socket(path: Path) -> None:
    """Replace a stale socket; refuse one that a live process still serves."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing stale socket path=%s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise StartupError(f"{path} exists and cannot be probed: {exc}") from exc
    finally:
        probe.close()
    raise StartupError(f"another process is already serving on {path}")


def _images(runtime: Runtime) -> ImageService:
    if runtime.images is None:
        raise StartupError("the image service did not start")
    return runtime.images
