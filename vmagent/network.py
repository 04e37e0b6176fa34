"""The pod's network inside the guest: the CNI interface's addresses, MTU and routes applied to
the virtio-net device that carries its MAC (busybox `ip`; names of devices vary, MACs do not)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb

SYS_NET = "/sys/class/net"


def device_with_mac(mac: str, sys_net: str = SYS_NET) -> str:
    for dev in sorted(os.listdir(sys_net)):
        try:
            with open(os.path.join(sys_net, dev, "address")) as f:
                if f.read().strip().lower() == mac.lower():
                    return dev
        except OSError:
            continue
    raise GRPCError(Status.FAILED_PRECONDITION, f"no network device with MAC {mac} in the guest")


def ip_commands(iface: pb.Interface, dev: str) -> list[list[str]]:
    """The `ip` invocations that give `dev` the interface's configuration, in order."""
    cmds = [["ip", "link", "set", "dev", "lo", "up"]]
    if iface.device_mac and iface.device_mac.lower() != iface.mac.lower():
        cmds.append(["ip", "link", "set", "dev", dev, "address", iface.mac])
    if iface.mtu:
        cmds.append(["ip", "link", "set", "dev", dev, "mtu", str(iface.mtu)])
    for address in iface.addresses:
        version = ipaddress.ip_interface(address).version
        cmds.append(["ip", f"-{version}", "addr", "add", address, "dev", dev])
    cmds.append(["ip", "link", "set", "dev", dev, "up"])
    for route in iface.routes:
        network = ipaddress.ip_network(route.destination, strict=False)
        destination = "default" if network.prefixlen == 0 else str(network)
        cmd = ["ip", f"-{network.version}", "route", "add", destination]
        if route.gateway:
            cmd += ["via", route.gateway]
        cmds.append([*cmd, "dev", dev])
    return cmds


def configure(interfaces: Sequence[pb.Interface]) -> None:
    """Apply every interface. Blocking (a few short `ip` runs): call from a thread."""
    for iface in interfaces:
        try:
            commands = ip_commands(iface, device_with_mac(iface.device_mac or iface.mac))
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"interface {iface.name}: {exc}") from exc
        for cmd in commands:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            if done.returncode != 0 and "File exists" not in done.stderr:
                raise GRPCError(Status.INTERNAL, f"{' '.join(cmd)}: {done.stderr.strip()}")
