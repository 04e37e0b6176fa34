"""Containers in the guest: the store of container records and their life cycle with the OCI
runtime, crun or runc (create, start, signal, wait, delete, update, stats). A record's status
changes only through `_set_status`, which checks the transition. Every log line names the
container.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent import cgroups, metrics, mountutil
from vmagent.api import agent_pb2 as pb
from vmagent.contract import SHARED_TAG
from vmagent.fastexec import DEFAULT_VMEXEC
from vmagent.idmap import IdMaps, spec_id_maps
from vmagent.imagevolumes import ImageVolume, mount_volume, unmount_volume
from vmagent.ociruntime import OciRuntime, OciRuntimeError, runtime_binary
from vmagent.ocispec import (
    PodContext,
    complete_spec,
    guest_devices,
    guest_hugepage_sizes,
    load_spec,
    wants_guest_devices,
)
from vmagent.pid1 import ChildExit, Reaper
from vmagent.podns import PodNamespaces
from vmagent.rootfs import (
    Mounts,
    Rootfs,
    dir_bytes,
    executable_in_rootfs,
    read_ahead,
    remove_tree,
)
from vmagent.stdio import DEFAULT_LIMIT, STDERR, STDOUT, OutputLog, PipeReader
from vmagent.steps import span
from vmagent.users import resolve_in_rootfs

if TYPE_CHECKING:
    from vmagent.fastexec import Plan

log = logging.getLogger("vmagent")

S = pb.ContainerState
# Allowed status transitions (from -> to).
_TRANSITIONS = {
    S.UNKNOWN: {S.CREATED},
    S.CREATED: {S.RUNNING, S.STOPPED},
    S.RUNNING: {S.STOPPED},
    S.STOPPED: set(),
}
# After init exits, processes it left behind (shared PID namespace) may hold its stdout open:
# wait this long for EOF, then take what the pipes hold and close them.
_OUTPUT_DRAIN = 2.0
_POD_SHM_SIZE = "64m"
# crun loads this program instead of compiling the spec's profile.
SECCOMP_BPF_ANNOTATION = "run.oci.seccomp_bpf_data"
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class Container:
    def __init__(self, container_id: str, sandbox_id: str, bundle: str, buffer: int) -> None:
        self.id = container_id
        self.sandbox_id = sandbox_id
        self.bundle = bundle
        self.status = S.UNKNOWN
        self.pid = 0
        self.created_ns = 0
        self.started_ns = 0
        self.exit: pb.ExitStatus | None = None
        self.spec: dict[str, Any] = {}
        self.rootfs: Rootfs | None = None
        self.image_volumes: list[ImageVolume] = []
        self.cgroup_dir = ""
        self.output = OutputLog(buffer)
        self.readers: list[PipeReader] = []
        self.exited: asyncio.Future[ChildExit] | None = None
        self.stopped = asyncio.Event()
        self.lock = asyncio.Lock()
        self.exec_serial = 0
        self.exec_plan: Plan | None = None  # vmexec's plan for execs with only an argv
        self.exec_filter = b""  # the spec's seccomp profile compiled for vmexec, once
        # Set by StartContainer or the container's removal: ends the executable's read-ahead.
        self.stop_reading_ahead = threading.Event()
        self.drainer: asyncio.Future[None] | None = None
        self.tty = False
        self.stdin_once = False
        self.stdin_fd = -1  # our end of its stdin: a pipe's write end, or the pty master (dup)
        self.console_fd = -1  # the pty master (dup) for resizes, with a tty
        self.stdin_attached = False  # an attach with stdin has begun (for stdin_once)

    def close_stdin(self) -> None:
        """The main process sees EOF on stdin (EOT on a terminal): CRI's stdin_once."""
        if self.stdin_fd < 0:
            return
        if self.tty:
            try:
                os.write(self.stdin_fd, b"\x04")
            except OSError:
                pass
        _close(self.stdin_fd)
        self.stdin_fd = -1
        log.info("container stdin closed id=%s", self.id)

    def state(self) -> pb.ContainerState:
        st = pb.ContainerState(container_id=self.id, status=self.status, pid=self.pid,
                               created_at_unix_nanos=self.created_ns,
                               started_at_unix_nanos=self.started_ns)
        if self.exit is not None:
            st.exit.CopyFrom(self.exit)
        user = (self.spec.get("process") or {}).get("user") or {}
        if user:
            st.user.CopyFrom(pb.User(uid=user.get("uid", 0), gid=user.get("gid", 0),
                                     additional_gids=user.get("additionalGids") or []))
        return st

    def running_init(self) -> bool:
        """Init is alive (or at least not yet reaped): its pid cannot have been reused."""
        return self.pid > 0 and self.exited is not None and not self.exited.done()


def _set_status(c: Container, new: int) -> None:
    if new == c.status:
        return
    if new not in _TRANSITIONS[c.status]:
        raise GRPCError(Status.FAILED_PRECONDITION,
                        f"container {c.id}: cannot go from {S.Status.Name(c.status)} to "
                        f"{S.Status.Name(new)}")
    log.info("container status id=%s from=%s to=%s", c.id, S.Status.Name(c.status),
             S.Status.Name(new))
    c.status = new  # type: ignore[assignment]


class Containers:
    """Every container of the pod, and the pod-level resources they share."""

    def __init__(self, reaper: Reaper, run_dir: str, exec_mode: str = "auto",
                 vmexec: str = "", oci_runtime: str = "auto",
                 runtime_fixed_addresses: bool = False) -> None:
        self.reaper = reaper
        self.exec_mode = exec_mode
        self.vmexec = vmexec
        self.run_dir = run_dir
        self.runtime = OciRuntime(reaper, runtime_binary(oci_runtime))
        if runtime_fixed_addresses:
            self.runtime.launcher = fixed_addresses_launcher(self.runtime.name, vmexec)
        self.mounts = Mounts(run_dir)
        self.podns = PodNamespaces(reaper, vmexec or DEFAULT_VMEXEC)
        self._by_id: dict[str, Container] = {}
        self._shm = ""
        self._shm_lock = asyncio.Lock()

    # --- lookup ------------------------------------------------------------------------------

    def get(self, container_id: str) -> Container:
        c = self._by_id.get(container_id)
        if c is None or c.status == S.UNKNOWN:
            raise GRPCError(Status.NOT_FOUND, f"container {container_id} not found")
        return c

    def all(self) -> list[Container]:
        return [c for c in self._by_id.values() if c.status != S.UNKNOWN]

    # --- create ------------------------------------------------------------------------------

    async def _pod_shm(self) -> str:
        async with self._shm_lock:
            if not self._shm:
                path = os.path.join(self.run_dir, "shm")

                def work() -> None:
                    os.makedirs(path, exist_ok=True)
                    if not mountutil.is_mountpoint(path):
                        mountutil.mount("shm", path, "tmpfs",
                                        mountutil.MS_NOSUID | mountutil.MS_NODEV,
                                        f"mode=1777,size={_POD_SHM_SIZE}")

                await asyncio.to_thread(work)
                self._shm = path
            return self._shm

    async def _pod_context(self, pid_mode: int, id_maps: IdMaps | None) -> PodContext:
        def existing(name: str) -> str:
            path = os.path.join(self.run_dir, name)
            return path if os.path.exists(path) else ""  # tmpfs stat

        ipc_uts = await self.podns.ipc_uts(id_maps)
        return PodContext(
            hosts=existing("hosts"), resolv_conf=existing("resolv.conf"),
            hostname=existing("hostname"), shm=await self._pod_shm(),
            ipc_uts_pid=ipc_uts, userns_pid=ipc_uts if id_maps is not None else 0,
            pid_ns_pid=await self.podns.pid() if pid_mode == 1 else 0)

    async def create(self, req: pb.CreateContainerRequest) -> pb.ContainerState:
        cid = req.container_id
        if not cid or not set(cid) <= _ID_CHARS or cid in (".", ".."):
            raise GRPCError(Status.INVALID_ARGUMENT, f"bad container id {cid!r}")
        if cid in self._by_id:
            raise GRPCError(Status.ALREADY_EXISTS, f"container {cid} already exists")
        spec = load_spec(req.oci_spec_json, cid)
        bundle = os.path.join(self.run_dir, "containers", cid)
        c = Container(cid, req.sandbox_id, bundle, req.stdio.buffer_bytes or DEFAULT_LIMIT)
        c.tty = req.stdio.tty or bool(spec["process"].get("terminal"))
        c.stdin_once = req.stdio.stdin_once
        self._by_id[cid] = c  # reserves the id; status UNKNOWN hides it from lookups
        t0 = time.monotonic()
        try:
            async with c.lock:
                await self._create(c, req, spec)
        except BaseException:
            await self._teardown(c)
            self._by_id.pop(cid, None)
            raise
        log.info("container created id=%s sandbox=%s runtime=%s pid=%d seconds=%.3f", cid,
                 req.sandbox_id, self.runtime.name, c.pid, time.monotonic() - t0)
        if c.rootfs is not None:
            # The guest is idle until StartContainer arrives: read the executable meanwhile,
            # not page fault by page fault as it starts. Start stops it: if the call comes
            # at once (kubelet's), reading more than the process touches would only delay it.
            asyncio.get_running_loop().run_in_executor(
                None, _read_ahead_executable, c.rootfs.path, c.spec["process"],
                c.stop_reading_ahead)
        return c.state()

    async def _create(self, c: Container, req: pb.CreateContainerRequest,
                      spec: dict[str, Any]) -> None:
        with span("shares"):
            await asyncio.to_thread(os.makedirs, c.bundle, exist_ok=True)
            shared_prefix = self.mounts.shared_dir + "/"
            if any(str(m.get("source", "")).startswith(shared_prefix)
                   for m in spec.get("mounts") or []):
                await self.mounts.ensure_share(SHARED_TAG, self.mounts.shared_dir,
                                               read_only=False)
            for m in req.mounts:
                if m.source.startswith("tag:") and m.target:
                    await self.mounts.ensure_share(m.source[4:], m.target,
                                                   read_only="ro" in m.options)
                elif m.source.startswith("image:") and m.target:
                    c.image_volumes.append(await mount_volume(self.mounts, m, c.id))
        id_maps = spec_id_maps(spec)
        # The pod's namespaces first: an idmapped rootfs takes the pod's user namespace.
        with span("pod_ns"):
            # A container of no pod yet runs where the pod's will: the VM's IPC and UTS
            # namespaces and the pod's /dev/shm (made here, empty, and kept for the pod).
            pod = (PodContext(outside_pod=True, ipc_uts_pid=os.getpid(),
                              shm=await self._pod_shm()) if req.outside_pod
                   else await self._pod_context(req.pid_namespace, id_maps))
        with span("rootfs"):
            c.rootfs = await self.mounts.make_rootfs(
                c.id, c.bundle, req.rootfs,
                idmap=(id_maps, f"/proc/{pod.userns_pid}/ns/user") if id_maps else None)
        with span("spec"):
            user = None
            if req.user:
                extra = [int(g) for g in
                         (spec["process"].get("user") or {}).get("additionalGids") or []]
                user = await asyncio.to_thread(resolve_in_rootfs, req.user, c.rootfs.path,
                                               extra, not req.strict_supplemental_groups)
            devices = await asyncio.to_thread(guest_devices) if wants_guest_devices(spec) \
                else None
            c.spec = complete_spec(spec, container_id=c.id, rootfs=c.rootfs.path, pod=pod,
                                   pid_mode=req.pid_namespace, user=user, terminal=c.tty,
                                   devices=devices, hugepage_sizes=guest_hugepage_sizes())
            if self.runtime.launcher:
                # The runtime runs without address randomisation: the container gets it back.
                c.spec["linux"].setdefault("personality", {"domain": "LINUX"})
        with span("seccomp"):
            await self._precompile_seccomp(c)
        with span("config"):
            c.cgroup_dir = cgroups.cgroup_dir(c.spec["linux"]["cgroupsPath"])
            config = json.dumps(c.spec).encode()
            await asyncio.to_thread(_write, os.path.join(c.bundle, "config.json"), config)

        pid_file = os.path.join(c.bundle, "init.pid")
        with span("oci_create"):
            if c.tty:
                await self._create_with_tty(c, pid_file, req.stdio.stdin)
            else:
                await self._create_with_pipes(c, pid_file, req.stdio.stdin)
        c.pid = _read_int(pid_file)
        c.created_ns = time.time_ns()
        c.exited = self.reaper.watch(c.pid)
        c.exited.add_done_callback(lambda fut: self._on_exit(c, fut))
        _set_status(c, S.CREATED)

    async def _precompile_seccomp(self, c: Container) -> None:
        """crun only: compile the spec's seccomp profile once with vmexec and hand crun the
        program (its run.oci.seccomp_bpf_data annotation); the container's execs load the
        same program. Otherwise crun compiles it at create and vmexec again at the first
        exec, each with its own copy of libseccomp to translate under TCG."""
        from vmagent import fastexec

        profile = c.spec["linux"].get("seccomp")
        vmexec = self.vmexec or fastexec.DEFAULT_VMEXEC
        if not profile or self.runtime.name != "crun" or not os.access(vmexec, os.X_OK):
            return
        try:
            rules, _ = fastexec.seccomp_rules(profile)
        except (fastexec.Unsupported, KeyError, ValueError, TypeError):
            return  # crun compiles what vmexec cannot (a notify listener, newer actions)
        c.exec_filter = await fastexec.compile_rules(vmexec, rules, self.reaper)
        c.spec.setdefault("annotations", {})[SECCOMP_BPF_ANNOTATION] = \
            base64.b64encode(c.exec_filter).decode()

    async def _create_with_pipes(self, c: Container, pid_file: str, stdin: bool) -> None:
        """stdout/stderr into the output log; stdin, if asked, a pipe whose write end we keep
        (so the process sees EOF only when we close it)."""
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r = -1
        if stdin:
            in_r, c.stdin_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(c.stdin_fd, False)
        open_readers = [2]

        def on_eof() -> None:
            open_readers[0] -= 1
            if open_readers[0] == 0:
                c.output.close()

        c.readers = [PipeReader(loop, out_r, STDOUT, c.output, on_eof),
                     PipeReader(loop, err_r, STDERR, c.output, on_eof)]
        try:
            await self.runtime.run(["create", "--bundle", c.bundle, "--pid-file", pid_file,
                                    c.id], what=f"container {c.id}: create", stdout=out_w,
                                   stderr=err_w, stdin=in_r if in_r >= 0 else None,
                                   log_path=os.path.join(c.bundle, "runtime.log"))
        finally:
            for fd in (out_w, err_w, in_r):
                _close(fd)

    async def _create_with_tty(self, c: Container, pid_file: str, stdin: bool) -> None:
        """The runtime makes the pty in the container and sends us its master: its output is
        the container's STDOUT; stdin and resizes are written to the same master."""
        from vmagent.console import ConsoleSocket

        console = ConsoleSocket(os.path.join(c.bundle, "console.sock"))
        receiving = asyncio.ensure_future(console.receive())
        # Not pipes: the container's init could keep them open; errors are in the JSON log.
        null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        try:
            await self.runtime.run(["create", "--bundle", c.bundle, "--pid-file", pid_file,
                                    "--console-socket", console.path, c.id],
                                   what=f"container {c.id}: create", stdout=null,
                                   stderr=null, log_path=os.path.join(c.bundle, "runtime.log"))
            master = await asyncio.wait_for(receiving, 10)
        finally:
            _close(null)
            receiving.cancel()
            console.close()
        c.console_fd = os.dup(master)
        if stdin:
            c.stdin_fd = os.dup(master)
        c.readers = [PipeReader(asyncio.get_running_loop(), master, STDOUT, c.output,
                                c.output.close)]

    async def _teardown(self, c: Container) -> None:
        """Undo whatever create got to; safe to call on a half-created container."""
        c.stop_reading_ahead.set()
        if c.pid or _exists(os.path.join(c.bundle, "config.json")):
            with span("oci_delete"):
                await self._delete_from_runtime(c)
        if c.exited is not None and not c.exited.done():
            try:
                with span("wait_exit"):
                    await asyncio.wait_for(asyncio.shield(c.exited), 10)
            except TimeoutError:
                log.warning("container init did not exit id=%s pid=%d", c.id, c.pid)
        for r in c.readers:
            r.drain()
            r.close()
        c.output.close()
        _close(c.stdin_fd)
        _close(c.console_fd)
        c.stdin_fd = c.console_fd = -1
        with span("unmount"):
            if c.rootfs is not None:
                await self.mounts.remove_rootfs(c.rootfs)
                c.rootfs = None
            while c.image_volumes:
                await unmount_volume(self.mounts, c.image_volumes.pop())
            await remove_tree(c.bundle)

    async def _delete_from_runtime(self, c: Container) -> None:
        """What `<runtime> delete --force` does; without a runtime process once init is gone."""
        if c.exited is not None and c.exited.done() and await asyncio.to_thread(
                release_exited, c.cgroup_dir, os.path.join(self.runtime.root, c.id)):
            return
        try:
            await self.runtime.run(["delete", "--force", c.id], what=f"container {c.id}: delete")
        except OciRuntimeError as exc:
            if exc.status != Status.NOT_FOUND:
                log.warning("%s delete failed id=%s error=%s", self.runtime.name, c.id,
                            exc.message)

    def _on_exit(self, c: Container, fut: asyncio.Future[ChildExit]) -> None:
        if fut.cancelled():
            return
        ex = fut.result()
        # Read before the runtime's delete removes the cgroup.
        oom = cgroups.oom_kills(c.cgroup_dir) > 0
        c.exit = pb.ExitStatus(exit_code=ex.code, signal=ex.signal,
                               reason=cgroups.exit_reason(ex.code, oom),
                               finished_at_unix_nanos=ex.finished_at_ns, oom_killed=oom)
        if c.status != S.UNKNOWN:
            _set_status(c, S.STOPPED)
        c.stopped.set()
        log.info("container exited id=%s code=%d signal=%d reason=%s", c.id, ex.code, ex.signal,
                 c.exit.reason)
        c.drainer = asyncio.ensure_future(self._finish_output(c))

    async def _finish_output(self, c: Container) -> None:
        try:
            await asyncio.wait_for(c.output.wait_eof(), _OUTPUT_DRAIN)
        except TimeoutError:
            log.info("container output still open after exit, closing id=%s", c.id)
        for r in c.readers:
            r.drain()
            r.close()

    # --- the rest of the life cycle ----------------------------------------------------------

    async def start(self, container_id: str) -> pb.ContainerState:
        c = self.get(container_id)
        async with c.lock:
            if c.status != S.CREATED:
                raise GRPCError(Status.FAILED_PRECONDITION,
                                f"container {c.id} is {S.Status.Name(c.status)}, not CREATED")
            c.stop_reading_ahead.set()
            with span("oci_start"):
                await self.runtime.run(["start", c.id], what=f"container {c.id}: start",
                                       log_path=os.path.join(c.bundle, "runtime.log"))
            c.started_ns = time.time_ns()
            if c.status == S.CREATED:  # it may have exited already
                _set_status(c, S.RUNNING)
        log.info("container started id=%s pid=%d", c.id, c.pid)
        return c.state()

    async def signal(self, req: pb.SignalContainerRequest) -> None:
        c = self.get(req.container_id)
        if req.exec_id:
            raise GRPCError(Status.NOT_FOUND, f"container {c.id}: no exec {req.exec_id}")
        signum = req.signal or signal.SIGTERM
        if req.all:
            with span("oci_kill"):
                await self.runtime.run(["kill", "--all", c.id, str(signum)],
                                       what=f"container {c.id}: kill")
        elif c.running_init():
            # What the runtime's kill does, without a runtime process: init is our child and
            # not yet reaped, so the pid is still its own.
            os.kill(c.pid, signum)
        log.info("container signalled id=%s signal=%d all=%s", c.id, signum, req.all)

    async def wait(self, req: pb.WaitContainerRequest) -> pb.ExitStatus:
        c = self.get(req.container_id)
        if req.exec_id:
            raise GRPCError(Status.NOT_FOUND, f"container {c.id}: no exec {req.exec_id}")
        await c.stopped.wait()
        assert c.exit is not None
        return c.exit

    async def delete(self, req: pb.DeleteContainerRequest) -> None:
        c = self._by_id.get(req.container_id)
        if c is None:
            return
        async with c.lock:
            if c.status == S.RUNNING and not req.force:
                raise GRPCError(Status.FAILED_PRECONDITION,
                                f"container {c.id} is {S.Status.Name(c.status)}; stop it first")
            if self._by_id.get(c.id) is not c:
                return  # a concurrent delete won
            await self._teardown(c)
            self._by_id.pop(c.id, None)
        log.info("container deleted id=%s", c.id)

    async def update(self, req: pb.UpdateResourcesRequest) -> None:
        c = self.get(req.container_id)
        try:
            json.loads(req.linux_resources_json)
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"container {c.id}: resources are not JSON: {exc}") from exc
        async with c.lock:
            path = os.path.join(c.bundle, "resources.json")
            await asyncio.to_thread(_write, path, req.linux_resources_json)
            await self.runtime.run(["update", "--resources", path, c.id],
                                   what=f"container {c.id}: update")
        log.info("container resources updated id=%s", c.id)

    async def stats(self, ids: list[str], details: bool = False) -> list[pb.ContainerStats]:
        """Usage of each container; with `details`, all that the CRI metrics report too."""
        chosen = [self.get(i) for i in ids] if ids else self.all()
        out = []
        for c in chosen:
            u = cgroups.usage(c.cgroup_dir)
            upper = c.rootfs.upper if c.rootfs is not None else ""
            layer = await asyncio.to_thread(dir_bytes, upper) if upper else 0
            stats = pb.ContainerStats(
                container_id=c.id, timestamp_unix_nanos=time.time_ns(),
                cpu_usage_nanos=u.cpu_usage_ns, memory_usage_bytes=u.memory_usage,
                memory_working_set_bytes=u.memory_working_set, memory_rss_bytes=u.memory_rss,
                pids=u.pids, writable_layer_bytes=layer)
            if details:
                # Walks /proc of every process in it: a thread, not the event loop.
                stats.details.CopyFrom(await asyncio.to_thread(
                    metrics.container_details, c.cgroup_dir, upper))
            out.append(stats)
        return out

    def network_pid(self) -> int | str:
        """A process in the pod's network namespace: a running container's init (containers
        share the guest's), or the agent itself."""
        return next((c.pid for c in self.all() if c.running_init()), "self")


def release_exited(cgroup: str, state_dir: str) -> bool:
    """What the runtime's delete does for a container whose init has exited and been reaped
    (by us: it is our child), without a runtime process (~0.2 s under TCG): remove its empty
    cgroup, then the runtime's state directory. False, having changed nothing, when a process
    is still in the cgroup (it outlived init: the runtime's delete --force kills it)."""
    if not cgroup:
        return False
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        pass
    except OSError as exc:  # EBUSY: still populated
        log.info("cgroup not released cgroup=%s error=%s", cgroup, exc)
        return False
    shutil.rmtree(state_dir, ignore_errors=True)
    return True


def fixed_addresses_launcher(runtime_name: str, vmexec: str) -> tuple[str, ...]:
    """How to run the runtime with fixed addresses, or () where that is unsafe or impossible:
    only crun is known to reset the container's personality from the spec (runc 1.1 ignores
    linux.personality), and the launcher is vmexec."""
    helper = vmexec or DEFAULT_VMEXEC
    if runtime_name != "crun" or not os.access(helper, os.X_OK):  # the guest's root: erofs
        return ()
    return (helper, "fixed-addresses", "--")


def _read_ahead_executable(rootfs: str, process: dict[str, Any],
                           stop: threading.Event) -> None:
    path = executable_in_rootfs(rootfs, process)
    if path is not None:
        read_ahead(path, stop)


def _read_int(path: str) -> int:
    with open(path) as f:  # tmpfs
        return int(f.read().strip())


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _exists(path: str) -> bool:
    return os.path.exists(path)  # tmpfs


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
