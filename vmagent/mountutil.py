"""Thin wrappers over mount(2), umount2(2) and loop devices (LOOP_CONFIGURE), for the agent's
image, overlay and share mounts. Every function here blocks: callers run them in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MNT_DETACH = 0x2

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 (232 bytes), u64 reserved[8].
_LOOP_INFO64_FLAGS_OFFSET = 5 * 8 + 3 * 4
_LOOP_CONFIG_SIZE = 4 + 4 + 232 + 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2). :raises OSError: with the kernel's errno and both paths in the message."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target} ({data}): "
                           f"{os.strerror(err)}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2); a target that is not mounted (or gone) is not an error."""
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:  # procfs
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def _attach_loop(path: str) -> tuple[str, int]:
    """Bind `path` to a free loop device, read-only and auto-clearing: the device goes away
    when the last user (our returned fd, then the mount) lets go of it."""
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(8):  # another process may grab the free device first
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                config = bytearray(_LOOP_CONFIG_SIZE)
                struct.pack_into("<II", config, 0, backing, 0)
                flags_at = 8 + _LOOP_INFO64_FLAGS_OFFSET
                struct.pack_into("<I", config, flags_at, _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR)
                name = os.path.basename(path).encode()[:63]
                config[flags_at + 4 : flags_at + 4 + len(name)] = name
                try:
                    fcntl.ioctl(fd, _LOOP_CONFIGURE, bytes(config))
                except OSError as exc:
                    os.close(fd)
                    if exc.errno == errno.EBUSY:
                        continue
                    raise
                return dev, fd
            raise OSError(errno.EBUSY, f"no free loop device for {path}")
        finally:
            os.close(ctl)
    finally:
        os.close(backing)


def mount_loop(path: str, target: str, fstype: str) -> str:
    """Loop-mount image file `path` read-only on `target`; returns the loop device. Unmounting
    frees the device (auto-clear)."""
    dev, fd = _attach_loop(path)
    try:
        mount(dev, target, fstype, MS_RDONLY)
    finally:
        os.close(fd)  # the mount now holds the device
    return dev
