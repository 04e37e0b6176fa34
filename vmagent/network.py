"""The pod's network inside the guest: the CNI interface's addresses, MTU and routes applied to
the virtio-net device that carries its MAC (names of devices vary, MACs do not), over rtnetlink
(vmagent/netlink.py) rather than busybox `ip` processes. Each step is described in `ip` syntax
for logs and errors."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.netlink import Netlink

SYS_NET = "/sys/class/net"

# (what `ip` would be told, Netlink method, its arguments after the device index, keywords)
Step = tuple[str, str, tuple[Any, ...], dict[str, Any]]


def device_with_mac(mac: str, sys_net: str = SYS_NET) -> str:
    for dev in sorted(os.listdir(sys_net)):
        try:
            with open(os.path.join(sys_net, dev, "address")) as f:
                if f.read().strip().lower() == mac.lower():
                    return dev
        except OSError:
            continue
    raise GRPCError(Status.FAILED_PRECONDITION, f"no network device with MAC {mac} in the guest")


def plan(iface: pb.Interface, dev: str) -> list[Step]:
    """The steps that give `dev` the interface's configuration, in order.

    :raises ValueError: a malformed address, route or gateway (before anything is changed)."""
    steps: list[Step] = []
    if iface.device_mac and iface.device_mac.lower() != iface.mac.lower():
        steps.append((f"ip link set dev {dev} address {iface.mac}", "link_set", (),
                      {"mac": iface.mac}))
    if iface.mtu:
        steps.append((f"ip link set dev {dev} mtu {iface.mtu}", "link_set", (),
                      {"mtu": iface.mtu}))
    for address in iface.addresses:
        version = ipaddress.ip_interface(address).version
        steps.append((f"ip -{version} addr add {address} dev {dev}", "address_add", (address,),
                      {}))
    steps.append((f"ip link set dev {dev} up", "link_set", (), {"up": True}))
    for route in iface.routes:
        network = ipaddress.ip_network(route.destination, strict=False)
        destination = "default" if network.prefixlen == 0 else str(network)
        what = f"ip -{network.version} route add {destination}"
        if route.gateway:
            if ipaddress.ip_address(route.gateway).version != network.version:
                raise ValueError(f"gateway {route.gateway} is not IPv{network.version}")
            what += f" via {route.gateway}"
        steps.append((f"{what} dev {dev}", "route_add", (str(network), route.gateway), {}))
    return steps


def configure(interfaces: Sequence[pb.Interface]) -> None:
    """Bring lo up and apply every interface. Blocking (netlink round trips): call from a
    thread. An address or route already there is left as it is."""
    planned = [(_index("lo"), [("ip link set dev lo up", "link_set", (), {"up": True})])]
    for iface in interfaces:
        dev = _device_of(iface)
        try:
            planned.append((_index(dev), plan(iface, dev)))
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"interface {iface.name}: {exc}") from exc
    with Netlink() as nl:
        for index, steps in planned:
            for what, method, args, kwargs in steps:
                try:
                    getattr(nl, method)(index, *args, **kwargs)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise GRPCError(Status.INTERNAL, f"{what}: {exc}") from exc


def _device_of(iface: pb.Interface) -> str:
    """The device booted with `device_mac`, or, on a second SetupSandbox, the one already
    given the pod's MAC."""
    if iface.device_mac and iface.device_mac.lower() != iface.mac.lower():
        try:
            return device_with_mac(iface.device_mac)
        except GRPCError:
            pass
    return device_with_mac(iface.mac)


def _index(dev: str) -> int:
    try:
        return socket.if_nametoindex(dev)
    except OSError as exc:
        raise GRPCError(Status.FAILED_PRECONDITION, f"network device {dev}: {exc}") from exc
