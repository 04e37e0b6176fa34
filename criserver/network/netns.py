"""Pod network namespaces: created pinned by a bind mount under our state dir, entered, removed.
Pods on the host pin their IPC and UTS namespaces the same way (`pin`).

Every namespace switch runs on a fresh, short-lived thread: unshare/setns change only the calling
thread, so doing it on a pooled thread would leak the namespace into unrelated later work, and
forking (pyroute2's own netns helpers fork) is unsafe in a process that runs grpcio.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pyroute2 import AsyncIPRoute

from criserver.errors import AlreadyExists, Internal, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
PINNABLE = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: returns the CLONE_NEW* type of the namespace
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11  # kernel error strings in netlink replies: better messages on failure

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


async def run_on_fresh_thread(
    fn: Callable[..., T], *args: Any, orphan: Callable[[T], object] | None = None
) -> T:
    """Run fn(*args) on a new thread that exits afterwards, without blocking the event loop.
    orphan(result) releases a result nobody awaits any more (the caller was cancelled)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():  # the awaiting task was cancelled
            if ok and orphan is not None:
                orphan(value)
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def runner() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=runner, name="netns", daemon=True).start()
    return await future


def _enter(path: Path) -> None:
    """Move the calling thread into the netns pinned at path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {path} does not exist") from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


def is_netns(path: Path) -> bool:
    """True when path is a mounted network namespace (not just a leftover empty file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: a plain file, the bind mount is gone
        return False
    finally:
        os.close(fd)


def _is_mountpoint(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)


def _prepare_dir(directory: Path) -> None:
    # As `ip netns` does for /run/netns: make the directory a shared mount so that our later
    # umount propagates into mount namespaces created meanwhile (a private copy there would pin
    # the netns, and with it the veth and IP, forever).
    directory.mkdir(parents=True, exist_ok=True)
    flags = MS_SHARED | MS_REC
    if _libc.mount(b"none", os.fsencode(directory), None, flags, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, f"make {directory} shared")
    _check(
        _libc.mount(
            os.fsencode(directory), os.fsencode(directory), b"none", MS_BIND | MS_REC, None
        ),
        f"bind {directory}",
    )
    _check(
        _libc.mount(b"none", os.fsencode(directory), None, flags, None), f"make {directory} shared"
    )


_prepare_lock = threading.Lock()


def _create(path: Path, kind: str = "net", hostname: str = "") -> None:
    with _prepare_lock:  # two first pods at once must not stack two bind mounts
        if not path.parent.is_dir() or not _is_mountpoint(path.parent):
            _prepare_dir(path.parent)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    except FileExistsError:
        raise AlreadyExists(f"{kind} namespace {path} already exists") from None
    try:
        _check(_libc.unshare(PINNABLE[kind]), f"unshare({kind})")
        if hostname:
            socket.sethostname(hostname)
        _check(
            _libc.mount(f"/proc/thread-self/ns/{kind}".encode(), os.fsencode(path), b"none",
                        MS_BIND, None),
            f"bind-mount {kind} namespace on {path}",
        )
    except BaseException:
        os.unlink(path)
        raise


async def create(path: Path) -> None:
    """Create a new, empty network namespace pinned at path (its parent dir is created).

    :raises AlreadyExists: path exists.
    """
    try:
        await run_on_fresh_thread(_create, path)
    except OSError as exc:
        raise Internal(f"create network namespace {path}: {exc}") from exc
    log.debug("netns created path=%s", path)


async def pin(path: Path, kind: str, hostname: str = "") -> None:
    """Create a new namespace of `kind` ("net", "ipc" or "uts", with `hostname` set in a new
    UTS namespace) pinned at path, which `remove` unpins.

    :raises AlreadyExists: path exists.
    """
    if kind not in PINNABLE:
        raise ValueError(f"cannot pin a {kind!r} namespace")
    try:
        await run_on_fresh_thread(_create, path, kind, hostname)
    except OSError as exc:
        raise Internal(f"create {kind} namespace {path}: {exc}") from exc
    log.debug("namespace pinned kind=%s path=%s", kind, path)


def _remove(path: Path) -> bool:
    existed = os.path.lexists(path)
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (any more)
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return existed


async def remove(path: Path) -> bool:
    """Unpin and delete the namespace at path; a missing path is fine (idempotent). Returns
    whether there was one.

    The kernel frees the namespace (and the devices inside) once nothing else holds it, e.g. a
    QEMU still holding a tap fd keeps it alive until that QEMU exits.
    """
    try:
        existed = await asyncio.to_thread(_remove, path)
    except OSError as exc:
        raise Internal(f"remove network namespace {path}: {exc}") from exc
    if existed:
        log.debug("netns removed path=%s", path)
    return existed


def _move(source: Path, target: Path) -> None:
    # A second pin of the same namespace, then the first one undone: the namespace (and what
    # lives in it) never goes unpinned on the way.
    try:
        os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
    except FileExistsError:
        raise AlreadyExists(f"namespace {target} already exists") from None
    try:
        if not is_netns(source):
            raise NotFound(f"no network namespace at {source}")
        _check(_libc.mount(os.fsencode(source), os.fsencode(target), b"none", MS_BIND, None),
               f"bind-mount {source} on {target}")
    except BaseException:
        os.unlink(target)
        raise
    _remove(source)


async def move(source: Path, target: Path) -> None:
    """Pin the namespace pinned at `source` at `target` instead (in the same directory).

    :raises AlreadyExists: target exists.
    :raises NotFound: no namespace is pinned at source.
    """
    try:
        await asyncio.to_thread(_move, source, target)
    except OSError as exc:
        raise Internal(f"move network namespace {source} to {target}: {exc}") from exc
    log.debug("netns moved from=%s to=%s", source, target)


def _release_dir(directory: Path) -> None:
    if any(directory.iterdir()):
        return
    if _is_mountpoint(directory):
        _check(_libc.umount2(os.fsencode(directory), MNT_DETACH), f"umount {directory}")
    directory.rmdir()


async def release_dir(directory: Path) -> None:
    """Undo the shared mount made on a netns directory when it holds no namespace any more
    (tests and uninstall; the daemon keeps it, as `ip netns` keeps /run/netns)."""
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(_release_dir, directory)


async def run_in(
    path: Path, fn: Callable[..., T], *args: Any, orphan: Callable[[T], object] | None = None
) -> T:
    """Run the blocking fn(*args) inside the netns at path, on its own thread (orphan: see
    run_on_fresh_thread).

    :raises NotFound: no namespace at path.
    """

    def entered() -> T:
        _enter(path)
        return fn(*args)

    return await run_on_fresh_thread(entered, orphan=orphan)


def _netlink_socket(path: Path) -> socket.socket:
    _enter(path)
    # A netlink socket belongs to the namespace it was created in, whichever thread uses it.
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    return sock


async def on_netlink_loop(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run `fn(*args)`, a coroutine using `rtnl`, on a stock asyncio loop in a thread of its own:
    pyroute2's netlink sockets need asyncio's selector loop (uvloop, the daemon's loop, cannot
    open AF_NETLINK datagram endpoints)."""

    def run() -> T:
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            return runner.run(fn(*args))

    return await asyncio.to_thread(run)


@contextlib.asynccontextmanager
async def rtnl(path: Path | None) -> AsyncIterator[AsyncIPRoute]:
    """An asyncio rtnetlink handle bound to the netns at path (None: the host's namespace).

    :raises NotFound: no namespace at path.
    """
    # Imported on first use: pyroute2 costs the daemon ~10 MiB, and an idle daemon needs none.
    from pyroute2 import AsyncIPRoute

    sock: socket.socket | None = None
    if path is not None:
        sock = await run_on_fresh_thread(_netlink_socket, path, orphan=socket.socket.close)
    ipr = AsyncIPRoute(use_socket=sock) if sock is not None else AsyncIPRoute()
    try:
        async with ipr:
            yield ipr
    finally:
        if sock is not None:
            sock.close()
