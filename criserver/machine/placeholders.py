"""Stand-ins for the reconciler and the console until they are wired into the daemon: machines
are stored and listed, nothing runs them (they stay PENDING), and Exec says so."""

from __future__ import annotations

import logging

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.errors import Unimplemented

log = logging.getLogger(__name__)


class StoreOnlyReconciler:
    def changed(self, machine_id: str) -> None:
        log.debug("machine changed machine=%s (no reconciler: nothing acts on it)", machine_id)


class NoConsole:
    async def exec_url(self, machine_id: str, request: iri.ExecRequest) -> str:
        raise Unimplemented(f"machine {machine_id}: machine consoles are not available yet")
