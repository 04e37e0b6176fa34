"""A pod's network, composed: its netns under the state dir, CNI ADD/DEL in it, and the tap that
carries the CNI interface into the VM. setup() undoes its own steps on failure; teardown() is
idempotent and works when the VM, the netns or both are already gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criserver.errors import InvalidArgument
from criserver.network import netns
from criserver.network.cni import CniManager, NetworkStatus, PodRef, PortMapping
from criserver.sandbox import tap
from criserver.sandbox.tap import GuestInterface, GuestRoute, TapInfo

log = logging.getLogger(__name__)

__all__ = [
    "GuestInterface",
    "GuestRoute",
    "NetworkInfo",
    "PodNetwork",
    "PortMapping",
    "TapInfo",
]


@dataclass(frozen=True)
class NetworkInfo:
    """Everything the backend and the agent need about a pod's network."""

    pod_id: str
    netns: str
    ips: list[str]  # PodSandboxStatus: the first is the pod IP, the rest additional IPs
    tap: TapInfo
    guest: GuestInterface
    cni_result: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod_id": self.pod_id,
            "netns": self.netns,
            "ips": self.ips,
            "tap": {
                "netns": self.tap.netns,
                "name": self.tap.name,
                "mac": self.tap.mac,
                "mtu": self.tap.mtu,
            },
            "guest": self.guest.to_dict(),
            "cni_result": self.cni_result,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkInfo:
        return cls(
            data["pod_id"],
            data["netns"],
            list(data["ips"]),
            TapInfo(**data["tap"]),
            GuestInterface.from_dict(data["guest"]),
            data["cni_result"],
        )


class PodNetwork:
    """Pod networks under `<state dir>/netns/<pod id>`, with CNI run by `cni`."""

    def __init__(self, cni: CniManager, state_dir: Path) -> None:
        self.cni = cni
        self.netns_dir = state_dir / "netns"

    def netns_path(self, pod_id: str) -> Path:
        if not pod_id or "/" in pod_id or pod_id.startswith("."):
            raise InvalidArgument(f"bad pod id {pod_id!r}")
        return self.netns_dir / pod_id

    async def status(self) -> NetworkStatus:
        return await self.cni.status()

    async def set_pod_cidr(self, cidr: str) -> None:
        await self.cni.set_pod_cidr(cidr)

    async def setup(
        self,
        pod_id: str,
        name: str,
        namespace: str,
        uid: str,
        port_mappings: Sequence[PortMapping] = (),
        *,
        host_network: bool = False,
    ) -> NetworkInfo:
        """Create the netns, run CNI ADD in it and move the CNI interface's traffic to a tap.

        :raises InvalidArgument: a hostNetwork pod (a VM cannot share the host's netns).
        :raises AlreadyExists: the pod's netns exists (tear down first).
        """
        if host_network:
            raise InvalidArgument(
                f"pod {namespace}/{name}: hostNetwork pods are not supported by micro-VM sandboxes"
            )
        path = await self.prepare(pod_id)
        try:
            return await self.connect(pod_id, name, namespace, uid, port_mappings)
        except BaseException:
            await netns.remove(path)
            raise

    async def prepare(self, pod_id: str) -> Path:
        """The first half of setup: the pod's netns with an unconnected tap, which is all QEMU
        needs to start. Undo with `teardown`.

        :raises AlreadyExists: the pod's netns exists (tear down first).
        """
        path = self.netns_path(pod_id)
        await netns.create(path)
        try:
            await tap.create_tap(path)
        except BaseException:
            await netns.remove(path)
            raise
        return path

    async def connect(
        self,
        pod_id: str,
        name: str,
        namespace: str,
        uid: str,
        port_mappings: Sequence[PortMapping] = (),
    ) -> NetworkInfo:
        """The second half of setup, while the VM boots: CNI ADD in the prepared netns, then
        the CNI interface's traffic moved to the tap. Undoes its own steps on failure, except
        the prepared netns (`teardown` removes everything)."""
        path = self.netns_path(pod_id)
        pod = PodRef(pod_id, name, namespace, uid)
        result = await self.cni.add(pod, str(path), port_mappings)  # undoes its own failure
        try:
            tap_info, guest = await tap.take_over(path, self.cni.ifname)
        except BaseException:
            # Not a bare DEL: take_over may have moved the addresses off eth0 already.
            try:
                await self.teardown_cni(pod_id)
            except Exception:
                log.exception("network setup undo failed pod=%s", pod_id)
            raise
        ips = result.pod_ips(self.cni.ifname)
        log.info("pod network ready pod=%s ips=%s netns=%s", pod_id, ",".join(ips), path)
        return NetworkInfo(pod_id, str(path), ips, tap_info, guest, result.raw)

    async def teardown(self, pod_id: str) -> bool:
        """CNI DEL with the cached ADD, then remove the netns. Safe to repeat; safe when the VM
        died or the netns is already gone. Stop the VM first: its tap fd pins the netns.
        Returns whether there was anything to remove."""
        added = await self.teardown_cni(pod_id)
        existed = await netns.remove(self.netns_path(pod_id))
        if added or existed:
            log.info("pod network removed pod=%s", pod_id)
        return added or existed

    async def teardown_cni(self, pod_id: str) -> bool:
        """CNI DEL with the cached ADD result, the netns left in place. Returns whether there
        was a cached ADD."""
        path = self.netns_path(pod_id)
        result = await self.cni.result(pod_id)
        if result is not None:
            # DEL needs the pod addresses on eth0 (see tap.give_back); when the netns is gone
            # (removed by hand, or a crash between the steps below) a stand-in is made for DEL.
            if not await asyncio.to_thread(netns.is_netns, path):
                await netns.remove(path)
                await netns.create(path)
            await tap.give_back(path, result.pod_addresses(self.cni.ifname), self.cni.ifname)
        await self.cni.delete(pod_id, str(path))
        return result is not None
