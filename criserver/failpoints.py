"""Named points where the daemon can be made to die on the spot (SIGKILL to itself), to prove
that a crash at any step of a call leaves nothing behind once the daemon restarts.

Armed only through the environment, read once at start: CRISERVER_FAILPOINTS=<name>[,<name>].
Unarmed (always, in production), a point costs one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "CRISERVER_FAILPOINTS"
_ARMED = frozenset(name for name in os.environ.get(ENV, "").split(",") if name)


def crash_point(name: str) -> None:
    """Die here if the point `name` is armed."""
    if name in _ARMED:
        log.critical("failpoint %s reached: the daemon kills itself", name)
        logging.shutdown()  # the line above reaches the log before the process ends
        os.kill(os.getpid(), signal.SIGKILL)
