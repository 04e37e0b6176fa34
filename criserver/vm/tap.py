"""The pod netns side of the VM's network: a persistent tap joined to the CNI veth by tc
`mirred egress redirect` both ways (no bridge, no extra process), and the description of the
veth's addresses and routes the guest agent applies to its virtio-net interface.

Choice: the tap is created persistent *inside* the pod netns, and QEMU (which stays in the host
netns) gets an fd for it: a /dev/net/tun fd belongs to the netns it was opened in, so
`open_tap_fd` opens it from a thread in the pod netns and QEMU receives it with
`-netdev tap,fd=N` (or QMP getfd + netdev_add). QEMU thus never runs in the pod netns, and the tap
with its filters exists before QEMU starts and outlives a QEMU crash; removing the netns frees it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2 import AsyncIPRoute

from criserver.errors import FailedPrecondition, Internal, NotFound
from criserver.network import netns as netns_mod

log = logging.getLogger(__name__)

TAP_NAME = "tap0"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # offloads (TSO/checksum) pass between guest and host
ETH_P_ALL = 0x0003
INGRESS_PARENT = 0xFFFF0000
RTPROT_KERNEL = 2  # routes the kernel made from an address: the guest gets them the same way
RTPROT_RA = 9


@dataclass(frozen=True)
class GuestRoute:
    dst: str  # CIDR; "0.0.0.0/0" / "::/0" for the default route
    gateway: str | None = None  # None: on-link


@dataclass(frozen=True)
class GuestInterface:
    """How the agent configures the guest's virtio-net interface: the CNI interface moved in."""

    name: str
    mac: str
    mtu: int
    addresses: list[str]  # with prefix: "10.88.0.5/16"
    routes: list[GuestRoute] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuestInterface:
        return cls(
            data["name"],
            data["mac"],
            int(data["mtu"]),
            list(data["addresses"]),
            [GuestRoute(r["dst"], r.get("gateway")) for r in data.get("routes", [])],
        )


@dataclass(frozen=True)
class TapInfo:
    """What the VM needs: the tap in the pod netns and the MAC/MTU its virtio-net must use."""

    netns: str
    name: str
    mac: str  # the CNI veth's MAC, given to the guest's virtio-net device
    mtu: int



def _ifreq(name: str, flags: int) -> bytes:
    encoded = name.encode()
    if len(encoded) >= 16:
        raise ValueError(f"interface name {name!r} too long")
    return struct.pack("16sH22x", encoded, flags)


def tun_open(name: str) -> int:
    # A tun fd, and a tap it creates, belong to the netns of the calling thread.
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_persistent_tap(name: str) -> None:
    fd = tun_open(name)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


async def open_tap_fd(netns_path: Path, name: str = TAP_NAME) -> int:
    """An fd attached to the pod's tap, for QEMU (`pass_fds`; close it once QEMU has started).
    The fd is close-on-exec: subprocess pass_fds makes it inheritable in the child only.

    :raises NotFound: no netns or no tap.
    """

    def attach() -> int:
        # TUNSETIFF would create a fresh, unfiltered tap if ours were missing: check first
        # (if_nametoindex asks the kernel in this thread's netns; /sys would show the host's).
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise NotFound(f"tap {name} does not exist in {netns_path}") from None
        return tun_open(name)

    try:
        return await netns_mod.run_in(netns_path, attach, orphan=os.close)
    except OSError as exc:
        raise Internal(f"open tap {name} in {netns_path}: {exc}") from exc


async def collect(reply: Any) -> list[Any]:
    """pyroute2 answers dumps with an async iterator and some gets with a plain list."""
    if hasattr(reply, "__aiter__"):
        return [m async for m in reply]
    return list(reply)


async def _one_link(ipr: AsyncIPRoute, name: str) -> Any:
    index = await ipr.link_lookup(ifname=name)
    if not index:
        raise NotFound(f"interface {name} not found")
    return (await collect(await ipr.link("get", index=index[0])))[0]


async def _read_guest_interface(
    ipr: AsyncIPRoute, index: int, mac: str, mtu: int, guest_name: str
) -> GuestInterface:
    addresses: list[str] = []
    for msg in await collect(await ipr.addr("dump", index=index)):
        if msg.get("index") != index or msg["scope"] != 0:  # 0: universe; skip link-local
            continue
        addresses.append(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
    routes: list[GuestRoute] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in await collect(await ipr.route("dump", family=family, table=254)):
            if msg.get("RTA_OIF") != index or msg["proto"] in (RTPROT_KERNEL, RTPROT_RA):
                continue
            if msg["type"] != 1:  # unicast only
                continue
            dst = msg.get("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            routes.append(GuestRoute(f"{dst}/{msg['dst_len']}", msg.get("RTA_GATEWAY")))
    # On-link routes first: a gateway must be reachable before a route through it is added.
    routes.sort(key=lambda r: r.gateway is not None)
    addresses.sort(key=lambda a: ipaddress.ip_interface(a).version)
    return GuestInterface(guest_name, mac, mtu, addresses, routes)


async def _redirect(ipr: AsyncIPRoute, src: int, dst: int) -> None:
    """Everything arriving on src leaves through dst (tc ingress + u32 match-all + mirred)."""
    await ipr.tc("add", "ingress", index=src)
    # pyroute2 requires a classid (target); it has no meaning under the ingress qdisc.
    await ipr.tc(
        "add-filter",
        "u32",
        index=src,
        parent=INGRESS_PARENT,
        protocol=ETH_P_ALL,
        target=0,
        keys=["0x0/0x0+0"],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
    )


async def take_over(
    netns_path: Path, ifname: str = "eth0", tap_name: str = TAP_NAME, guest_name: str = "eth0"
) -> tuple[TapInfo, GuestInterface]:
    """Join the CNI interface to a new tap in the pod netns and hand its addresses to the guest.

    :raises NotFound: no netns or no CNI interface in it.
    :raises FailedPrecondition: the interface has no address (nothing for the guest to use).
    """
    return await netns_mod.on_netlink_loop(_take_over, netns_path, ifname, tap_name, guest_name)


async def create_tap(netns_path: Path, tap_name: str = TAP_NAME) -> None:
    """A persistent tap in the pod netns, before CNI has run, so QEMU can start on it while the
    network is still being set up; `take_over` later joins it to the CNI interface."""

    def create() -> None:
        try:
            socket.if_nametoindex(tap_name)
            return  # made already (a retried setup): attaching again would fail if in use
        except OSError:
            create_persistent_tap(tap_name)

    try:
        await netns_mod.run_in(netns_path, create)
    except OSError as exc:
        raise Internal(f"create tap {tap_name} in {netns_path}: {exc}") from exc


async def _take_over(
    netns_path: Path, ifname: str, tap_name: str, guest_name: str
) -> tuple[TapInfo, GuestInterface]:
    await create_tap(netns_path, tap_name)
    async with netns_mod.rtnl(netns_path) as ipr:
        veth = await _one_link(ipr, ifname)
        tap = await _one_link(ipr, tap_name)
        mac, mtu = veth.get("IFLA_ADDRESS"), veth.get("IFLA_MTU")
        guest = await _read_guest_interface(ipr, veth["index"], mac, mtu, guest_name)
        if not guest.addresses:
            raise FailedPrecondition(f"{ifname} in {netns_path} has no address to give the VM")
        await ipr.link("set", index=tap["index"], mtu=mtu, state="up")
        await _redirect(ipr, veth["index"], tap["index"])
        await _redirect(ipr, tap["index"], veth["index"])
        # The guest now owns the pod IP. Ingress on the veth is redirected, so the netns stack
        # never sees a frame, but it must not hold the same IP as a second owner either: its
        # routes and local-address table would answer for the pod IP (ARP, RSTs) if the filter
        # ever went missing, and anything run in this netns would pick the IP as source.
        # Flushing (as Kata does) also drops the routes through the veth with it.
        await ipr.flush_addr(index=veth["index"])
    info = TapInfo(str(netns_path), tap_name, mac, mtu)
    log.info(
        "tap redirect ready netns=%s tap=%s mac=%s mtu=%s addrs=%s",
        netns_path,
        tap_name,
        mac,
        mtu,
        ",".join(guest.addresses),
    )
    return info, guest
