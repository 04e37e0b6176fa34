"""The exit codes and reasons criserver chooses when no process reported its own.

A container normally exits with the status its process gave; these rules cover the cases where
criserver must decide for it, so every caller says the same thing to kubelet.
"""

from __future__ import annotations

import signal

from criserver.store.records import ContainerExit

# What a shell reports for a process killed by a signal: 128 + the signal number.
KILLED = 128 + signal.SIGKILL  # 137
# The process never ran: as runc (and containerd) report a failed start.
START_FAILED = 128
# Nobody can tell how it ended: its VM or its agent lost track of it.
LOST = 255

ERROR = "Error"  # the reason kubelet shows for a non-zero exit
START_ERROR = "StartError"


def stop_unreported() -> ContainerExit:
    """StopContainer killed it and the backend reported no status."""
    return ContainerExit(KILLED, ERROR, "stopped; no exit status reported")


def pod_stopped() -> ContainerExit:
    """StopPodSandbox took the sandbox down: every process in it was killed."""
    return ContainerExit(KILLED, ERROR, "pod sandbox stopped")


def start_failed(error: BaseException) -> ContainerExit:
    return ContainerExit(START_FAILED, START_ERROR, str(error))


def sandbox_gone(reason: str, message: str) -> ContainerExit:
    """The sandbox died on its own: its containers went with it, status unknown."""
    return ContainerExit(LOST, reason, message)
