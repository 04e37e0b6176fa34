"""criserver: a Kubernetes CRI runtime that runs every pod in its own QEMU micro-VM."""

import os
from importlib.metadata import PackageNotFoundError, version

# The daemon forks often (QEMU, CNI plugins, mkfs.erofs). With gRPC's fork support on, gRPC core
# restarts its threads in every child between fork and exec, and they crash there now and then
# (SIGSEGV in event_engine): a CNI plugin then "fails" with signal 11. Nothing here needs gRPC
# in a forked child, so the support stays off. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

try:
    __version__ = version("criserver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
