"""The few rtnetlink requests the guest's network setup needs (link up/MTU/MAC, address add,
route add), on one socket, with no process: under TCG each busybox `ip` fork cost ~50 ms, five
or six of them per pod. Requests are acknowledged one by one; a failure is an OSError with the
kernel's errno. Blocking: use from a thread.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst/src len, tos, table, proto, scope,
#                                         type, flags
_ATTR = struct.Struct("=HH")


def _attr(kind: int, data: bytes) -> bytes:
    raw = _ATTR.pack(_ATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


class Netlink:
    """One NETLINK_ROUTE socket in the caller's network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        self._sock.settimeout(10)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> None:
        """Send one request and wait for its acknowledgement; OSError(errno) if refused."""
        self._seq += 1
        seq = self._seq
        msg = _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                           seq, 0) + body
        self._sock.send(msg)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _, mseq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError(f"netlink: malformed reply (length {length})")
                if mtype == NLMSG_ERROR and mseq == seq:
                    (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return
                offset += (length + 3) & ~3

    def link_set(self, index: int, *, up: bool = False, mtu: int = 0, mac: str = "") -> None:
        """What `ip link set dev X [address M] [mtu N] [up]` does."""
        attrs = b""
        if mac:
            attrs += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        if mtu:
            attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
        change = IFF_UP if up else 0
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change) + attrs
        self._request(RTM_NEWLINK, 0, body)

    def address_add(self, index: int, address: str) -> None:
        """What `ip addr add A/N dev X` does."""
        iface = ipaddress.ip_interface(address)
        packed = iface.ip.packed
        body = _IFADDR.pack(_family(iface.version), iface.network.prefixlen, 0,
                            RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def route_add(self, index: int, destination: str, gateway: str = "") -> None:
        """What `ip route add D [via G] dev X` does (main table, proto boot; link scope for
        an IPv4 route without a gateway, as ip chooses)."""
        network = ipaddress.ip_network(destination, strict=False)
        scope = RT_SCOPE_LINK if not gateway and network.version == 4 else RT_SCOPE_UNIVERSE
        body = _RTMSG.pack(_family(network.version), network.prefixlen, 0, 0, RT_TABLE_MAIN,
                           RTPROT_BOOT, scope, RTN_UNICAST, 0)
        if network.prefixlen:
            body += _attr(RTA_DST, network.network_address.packed)
        if gateway:
            via = ipaddress.ip_address(gateway)
            if via.version != network.version:
                raise ValueError(f"gateway {gateway} is not IPv{network.version}")
            body += _attr(RTA_GATEWAY, via.packed)
        body += _attr(RTA_OIF, struct.pack("=I", index))
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
