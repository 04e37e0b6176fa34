"""A pod's network on the host: its netns under the state dir and CNI ADD/DEL/CHECK in it.

What is done with the CNI interface afterwards is the backend's: a host backend's containers
join the netns as it is; a VM backend carries the interface's addresses into its guest
(criserver.vm.tap). Before DEL they are put back where ADD left them, whichever it was.
teardown() is idempotent and works when the netns is already gone.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from criserver.config import Config
from criserver.errors import InvalidArgument
from criserver.network import netns
from criserver.network.cni import (
    CniManager,
    DefaultNetwork,
    NetworkStatus,
    PodRef,
    PortMapping,
)

log = logging.getLogger(__name__)

__all__ = ["Attachment", "PodNetwork", "PortMapping"]


@dataclass(frozen=True)
class Attachment:
    """A pod's netns after CNI ADD."""

    pod_id: str
    netns: Path
    ifname: str  # the CNI interface in the netns
    ips: list[str]  # PodSandboxStatus: the first is the pod IP, the rest additional IPs


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

    async def prepare(self, pod_id: str) -> Path:
        """The pod's empty netns, before CNI: a backend can start what joins it (a VM on a tap
        in it) while CNI runs. Undo with `teardown`.

        :raises AlreadyExists: the pod's netns exists (tear down first).
        """
        path = self.netns_path(pod_id)
        await netns.create(path)
        return path

    async def hand_over(self, from_id: str, to_id: str) -> Path:
        """The netns `prepare` made for `from_id` (a pooled VM's, with its tap), as pod
        `to_id`'s prepared netns; before CNI: nothing is cached under `from_id`."""
        path = self.netns_path(to_id)
        await netns.move(self.netns_path(from_id), path)
        return path

    async def connect(
        self,
        pod_id: str,
        name: str,
        namespace: str,
        uid: str,
        port_mappings: Sequence[PortMapping] = (),
    ) -> Attachment:
        """CNI ADD in the prepared netns (undoes its own failure; `teardown` removes the
        rest)."""
        path = self.netns_path(pod_id)
        pod = PodRef(pod_id, name, namespace, uid)
        result = await self.cni.add(pod, str(path), port_mappings)
        ips = result.pod_ips(self.cni.ifname)
        log.info("pod network ready pod=%s ips=%s netns=%s", pod_id, ",".join(ips), path)
        return Attachment(pod_id, path, self.cni.ifname, ips)

    async def check(self, pod_id: str) -> None:
        """CNI CHECK of the pod's network, as ADD left it.

        :raises NotFound: the pod has no network.
        """
        await self.cni.check(pod_id, str(self.netns_path(pod_id)))

    async def teardown(self, pod_id: str) -> bool:
        """CNI DEL with the cached ADD, then remove the netns. Safe to repeat; safe when the
        netns is already gone. Whatever holds the netns (a VM's tap) should be gone first.
        Returns whether there was anything to remove."""
        added = await self.delete(pod_id)
        return await self.remove_netns(pod_id, added)

    async def remove_netns(self, pod_id: str, deleted: bool = False) -> bool:
        """The netns's removal, the last step of `teardown` (after a `delete` made while
        something still held the netns: `deleted` says whether it had a cached ADD)."""
        existed = await netns.remove(self.netns_path(pod_id))
        if deleted or existed:
            log.info("pod network removed pod=%s", pod_id)
        return deleted or existed

    async def delete(self, pod_id: str) -> bool:
        """CNI DEL with the cached ADD result, the netns left in place. Returns whether there
        was a cached ADD."""
        path = self.netns_path(pod_id)
        result = await self.cni.result(pod_id)
        if result is not None:
            # DEL needs the netns; when it is gone (removed by hand, or a crash between the
            # steps of teardown) a stand-in is made for DEL.
            if not await asyncio.to_thread(netns.is_netns, path):
                await netns.remove(path)
                await netns.create(path)
            await netns.on_netlink_loop(_restore_addresses, path,
                                        result.pod_addresses(self.cni.ifname), self.cni.ifname)
        await self.cni.delete(pod_id, str(path))
        return result is not None


def daemon_network(config: Config) -> PodNetwork:
    """The daemon's one pod network: CNI's cache under the daemon's root, pods' netns under its
    state dir (volatile: gone with the host's reboot, like the netns themselves)."""
    net = config.network
    cni = CniManager(net, Path(config.daemon.root) / "cni",
                     default_network=DefaultNetwork(net.default_network_name, net.default_bridge),
                     plugin_timeout=net.plugin_timeout)
    return PodNetwork(cni, Path(config.daemon.state))


async def _restore_addresses(netns_path: Path, addresses: list[str], ifname: str) -> None:
    """Before CNI DEL: the pod addresses back on the CNI interface (made up as a stand-in veth
    when it is gone). The bridge plugin finds the masquerade rules to delete from the addresses
    on the interface it removes: without this DEL would leave them behind."""
    from pyroute2.netlink.exceptions import NetlinkError

    async with netns.rtnl(netns_path) as ipr:
        index = await ipr.link_lookup(ifname=ifname)
        if not index:
            await ipr.link("add", ifname=ifname, kind="veth", peer=f"{ifname}-standin")
            index = await ipr.link_lookup(ifname=ifname)
        for addr in addresses:
            iface = ipaddress.ip_interface(addr)
            try:
                await ipr.addr(
                    "add", index=index[0], address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
