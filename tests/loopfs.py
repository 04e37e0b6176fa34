"""Small ext4 filesystems on loop devices, made by a test to run something out of space (the
image store, a log directory), and filled or freed at will. Root only."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BALLAST = ".ballast"


@contextmanager
def loop_fs(target: Path, mib: int, image: Path | None = None) -> Iterator[Path]:
    """An ext4 of `mib` MiB (no reserved blocks) mounted at `target` (made if missing); always
    unmounted and its image file removed at the end."""
    image = image or target.parent / f".{target.name}.ext4"
    target.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", str(image)],
                   check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True,
                   capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> None:
    """Take the filesystem of `path` down to about `leave` bytes free, with a ballast file."""
    ballast = path / BALLAST
    chunk = b"\0" * (1 << 20)
    with open(ballast, "ab", buffering=0) as f:
        while True:
            room = free_bytes(path) - leave
            if room <= 0:
                break
            try:
                f.write(chunk[:min(room, len(chunk))])
                os.fsync(f.fileno())
            except OSError:  # full before `leave` was reached: as full as it gets
                break


def unfill(path: Path) -> None:
    """Give the ballast's space back."""
    (path / BALLAST).unlink(missing_ok=True)
    os.sync()
