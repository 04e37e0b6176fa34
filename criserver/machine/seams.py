"""What the machine service asks of the code that makes machines real (the reconciler, the
console), as Protocols: the service only records desired state and says which machine changed.

The other direction, what the reconciler may use: `MachineStore` (criserver/machine/store.py:
`get`, `require`, `list`, `ids`, `update_status`, `remove`), `EventStore.record`
(criserver/machine/events.py) and `MachineClasses.shape` (classes.py).
docs/design/machine-runtime.md describes both sides.
"""

from __future__ import annotations

from typing import Protocol

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri


class Reconciler(Protocol):
    def changed(self, machine_id: str) -> None:
        """The machine's desired state changed (created, spec edited, deletion asked): look at
        it again soon. Must return at once and never raise; the work happens elsewhere."""


class ExecConsole(Protocol):
    async def exec_url(self, machine_id: str, request: iri.ExecRequest) -> str:
        """A single-use URL on the streaming server for the machine's serial console. The
        service has checked that the machine exists and is not being deleted.

        :raises FailedPrecondition: a console session is already open on the machine.
        :raises ResourceExhausted: too many URLs handed out and not used yet.
        :raises Unavailable: the machine has no console yet (not running).
        """
        ...
