"""A MachineRuntime client over grpcio for the tests: every RPC by name, and waits on a machine's
status (what a machinepoollet does by polling ListMachines)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri

SERVICE = iri.DESCRIPTOR.services_by_name["MachineRuntime"]
RESPONSES = {m.name: getattr(iri, m.output_type.name) for m in SERVICE.methods}


class MachineClient:
    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")

    async def call(self, method: str, request: Any, timeout: float = 10) -> Any:
        rpc = self.channel.unary_unary(
            f"/{SERVICE.full_name}/{method}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=RESPONSES[method].FromString)
        return await rpc(request, timeout=timeout)

    async def list_ids(self, machine_id: str = "", **labels: str) -> list[str]:
        response = await self.call("ListMachines", iri.ListMachinesRequest(
            filter=iri.MachineFilter(id=machine_id, label_selector=labels)))
        return [m.metadata.id for m in response.machines]

    async def get(self, machine_id: str) -> iri.Machine | None:
        response = await self.call("ListMachines", iri.ListMachinesRequest(
            filter=iri.MachineFilter(id=machine_id)))
        return response.machines[0] if response.machines else None

    async def wait(self, machine_id: str, check: Callable[[iri.Machine | None], bool],
                   what: str, timeout: float = 120, interval: float = 0.2
                   ) -> iri.Machine | None:
        """The machine (None once gone) as soon as `check` holds for it."""
        deadline = time.monotonic() + timeout
        while True:
            machine = await self.get(machine_id)
            if check(machine):
                return machine
            if time.monotonic() > deadline:
                raise AssertionError(f"machine {machine_id}: not {what} after {timeout:.0f}s; "
                                     f"now {machine}")
            await asyncio.sleep(interval)

    async def wait_settled(self, machine_id: str, state: int, timeout: float = 120,
                           interval: float = 0.2) -> iri.Machine:
        """Until the machine is in `state` with its current generation observed."""
        machine = await self.wait(
            machine_id, lambda m: m is not None and m.status.state == state
            and m.status.observed_generation == m.metadata.generation,
            iri.MachineState.Name(state), timeout, interval)
        assert machine is not None
        return machine

    async def reasons(self, machine_id: str) -> list[str]:
        response = await self.call("ListEvents", iri.ListEventsRequest(
            filter=iri.EventFilter(id=machine_id)))
        return [e.spec.reason for e in response.events]

    async def close(self) -> None:
        await self.channel.close()
