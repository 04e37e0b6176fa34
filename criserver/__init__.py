"""criserver: a Kubernetes CRI runtime that runs every pod in its own QEMU micro-VM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("criserver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
