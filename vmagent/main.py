"""The agent's life: read settings, become a good PID 1, serve until asked to shut down, then
power the VM off. As PID 1 it must never exit (the kernel panics): failures power off instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from vmagent import guestinfo
from vmagent.settings import Settings, load

if TYPE_CHECKING:
    from vmagent.ociruntime import OciRuntime

log = logging.getLogger("vmagent")


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s vmagent %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


async def serve(settings: Settings, started_uptime: float) -> int:
    """Serve until Shutdown or SIGTERM; returns the reboot(2) action to take."""
    # Imported here so `main` can report a broken install through the log instead of dying
    # with a bare traceback on the console.
    from vmagent.pid1 import RB_AUTOBOOT, RB_POWER_OFF, Reaper, become_subreaper
    from vmagent.server import AgentServer
    from vmagent.service import AgentService, AgentState, HealthService

    log.info("imported uptime=%.3f", guestinfo.uptime())
    if os.getpid() == 1:  # the VM's init, never an agent a test runs on the host
        from vmagent.sandbox import apply_node_tunables

        log.info("node tunables set=%s", ",".join(apply_node_tunables()) or "-")
    loop = asyncio.get_running_loop()
    reaper = Reaper(loop)
    reaper.install()
    state = AgentState(reaper, settings.run_dir, started_uptime)
    state.exec_mode = settings.exec_mode
    state.vmexec = settings.vmexec
    state.oci_runtime = settings.oci_runtime
    state.runtime_fixed_addresses = settings.runtime_fixed_addresses
    server = AgentServer(
        [HealthService(state), AgentService(state)], settings.transport,
        port_name=settings.port_name, vsock_port=settings.vsock_port,
        poll_interval=settings.poll_interval)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request, state.shutdown_requested)
    if settings.template:
        await asyncio.to_thread(_preload_for_clones, settings.vmexec, settings.oci_runtime)
        await _preload_runtime_libraries(state.containers.runtime)
    await server.start()
    state.transport = server.kind
    state.connections = lambda: server.connections
    state.serving_uptime = guestinfo.uptime()
    log.info("ready started_uptime=%.3f serving_uptime=%.3f", started_uptime,
             state.serving_uptime)
    # Work that can wait until the host can already reach us.
    loop.call_soon(become_subreaper)
    # Boot left ~10 MB of page cache (Python's start-up files) the idle agent no longer needs:
    # dropped once the guest settled, free page reporting returns it to the host.
    if not settings.template:
        loop.call_later(10.0, _drop_page_cache)
    action = await state.shutdown_requested
    # Let the Shutdown answer leave before the connection goes away.
    await asyncio.sleep(0.05)
    server.close()
    return RB_AUTOBOOT if action == 1 else RB_POWER_OFF


def _preload_for_clones(vmexec: str, oci_runtime: str) -> None:
    """Import the container code and read the OCI runtime's and vmexec's binaries into the
    page cache: in a template this is done once for all clones, which then share it
    (measured: 8 MiB less private memory per clone)."""
    import vmagent.container_exec
    import vmagent.containers
    import vmagent.execsync
    import vmagent.network
    import vmagent.sandbox  # noqa: F401
    from vmagent.fastexec import DEFAULT_VMEXEC
    from vmagent.ociruntime import runtime_binary

    for path in (runtime_binary(oci_runtime), vmexec or DEFAULT_VMEXEC):
        try:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except OSError as exc:
            log.warning("preload %s: %s", path, exc)


async def _preload_runtime_libraries(runtime: OciRuntime) -> None:
    """Run the OCI runtime once (`--version`), so the shared libraries crun loads are in the
    template's page cache too."""
    try:
        await runtime.run(["--version"], what="preload")
    except Exception as exc:  # a template without a working runtime still boots
        log.warning("preload runtime: %s", exc)


def _drop_page_cache() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("drop_caches: %s", exc)


def _request(fut: asyncio.Future[int]) -> None:
    if not fut.done():
        fut.set_result(0)


def _run(main: Coroutine[Any, Any, int]) -> int:
    """On uvloop when the guest has it (it does: guestbuild installs it), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str], started_uptime: float | None = None) -> int:
    if started_uptime is None:
        started_uptime = guestinfo.uptime()
    settings = load(argv)
    _setup_logging(settings.log_level)
    log.info("starting started_uptime=%.3f uptime=%.3f settings=%s", started_uptime,
             guestinfo.uptime(), settings)
    action = None
    try:
        action = _run(serve(settings, started_uptime))
    except BaseException:
        log.exception("agent failed")
        if not settings.power_off:
            return 1
    if settings.power_off:
        from vmagent.pid1 import RB_POWER_OFF, power_off

        power_off(RB_POWER_OFF if action is None else action)
    return 0
