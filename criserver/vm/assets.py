"""Locate and check the installed guest assets (kernel, initramfs, erofs root).

`guestbuild` writes them under `<assets dir>/<sha256>/` with a manifest.json and a `current`
symlink; this module reads that layout for the VM code and for `criserver check`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criserver.errors import FailedPrecondition

DEFAULT_ASSETS_DIR = Path("/usr/local/share/criserver/guest")
MANIFEST_FORMAT = 1


class AssetsError(FailedPrecondition):
    """The guest assets are missing, incomplete or corrupt; the message says which and where."""


@dataclass(frozen=True)
class GuestAssets:
    path: Path  # the versioned directory (resolved, not the `current` link)
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def kernel(self) -> Path:
        return self.path / str(self.manifest["kernel"])

    @property
    def initramfs(self) -> Path:
        return self.path / str(self.manifest["initramfs"])

    @property
    def root(self) -> Path:
        return self.path / str(self.manifest["root"])

    @property
    def root_serial(self) -> str:
        return str(self.manifest["root_serial"])

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])

    @property
    def module_groups(self) -> frozenset[str]:
        return frozenset(self.manifest.get("module_groups", {}))

    def verify(self, full: bool = True) -> None:
        """Check every file's size, and with `full` its sha256 (reads ~150 MB: call it from a
        thread in async code).

        :raises AssetsError: naming the first file that is missing or differs.
        """
        for name, meta in sorted(self.manifest["files"].items()):
            p = self.path / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise AssetsError(f"guest assets {self.path}: {name} is missing") from None
            if size != meta["size"]:
                raise AssetsError(
                    f"guest assets {self.path}: {name} has size {size}, "
                    f"manifest says {meta['size']}"
                )
            if full and sha256_file(p) != meta["sha256"]:
                raise AssetsError(f"guest assets {self.path}: {name} does not match its sha256")


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(assets_dir: Path = DEFAULT_ASSETS_DIR, version: str = "current") -> GuestAssets:
    """Load the manifest of one installed version (default: the `current` link).

    Blocking but small (one stat + one JSON read); fine to call at daemon start-up.

    :raises AssetsError: when the directory, the link or the manifest is missing or invalid.
    """
    base = Path(assets_dir)
    link = base / version
    if not link.exists():
        raise AssetsError(
            f"no guest assets at {link}: build them with `make guest` "
            f"(python -m guest.build --assets-dir {base})"
        )
    path = link.resolve()
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise AssetsError(f"guest assets {path}: manifest.json is missing") from None
    except (OSError, ValueError) as e:
        raise AssetsError(f"guest assets {path}: cannot read manifest.json: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise AssetsError(
            f"guest assets {path}: manifest format {manifest.get('format')!r} "
            f"is not {MANIFEST_FORMAT}: rebuild with `make guest`"
        )
    for key in ("kernel", "initramfs", "root", "root_serial", "files", "kernel_release"):
        if key not in manifest:
            raise AssetsError(f"guest assets {path}: manifest.json lacks {key!r}")
    return GuestAssets(path=path, manifest=manifest)
