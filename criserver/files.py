"""Small state files replaced whole: written beside their final name, then renamed over it, so
a reader, or the daemon after a crash, finds the old content or the new and never half of
either. A crash between the two steps leaves the temp file: its owner removes it with the file
(`temp_name`). One writer per path at a time (callers serialise), so the temp name is fixed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def temp_name(path: Path) -> Path:
    """Where `write_atomic` writes before the rename: hidden, in the same directory."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644,
                 durable: bool = False) -> None:
    """Replace path's content with data (blocking: call it in a thread from async code).

    mode is set exactly, whatever the umask. durable also syncs the data before the rename
    (for state under the persistent root that must survive a power loss, not only a crash).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove(path: Path) -> None:
    """path and any temp file a crash left beside it; nothing there is not an error."""
    for each in (path, temp_name(path)):
        with contextlib.suppress(FileNotFoundError):
            each.unlink()
