"""IRI machine NICs on the host: one Linux bridge per `network_id`, one persistent tap per NIC.

Machines are not pods: no CNI and no network namespace. A NIC's `network_id` names an L2
segment; every machine NIC on that segment is a tap port of the same host bridge, which an
operator (or a later network provider) connects onwards. Names are derived from the ids (Linux
interface names are 15 bytes at most), so the daemon finds them again after a restart without
keeping a table. The tap exists before QEMU starts and outlives a QEMU crash; QEMU gets an fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket

from criserver.errors import Internal
from criserver.network import netns
from criserver.vm import tap

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "crmb"  # criserver machine bridge
TAP_PREFIX = "crmt"  # criserver machine tap


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + _digest(network_id)[:10]


def tap_name(machine_id: str, nic_name: str) -> str:
    return TAP_PREFIX + _digest(machine_id, nic_name)[:10]


def mac_address(machine_id: str, nic_name: str) -> str:
    """A stable, locally administered unicast MAC for a machine NIC."""
    raw = bytes.fromhex(_digest("mac", machine_id, nic_name)[:12])
    first = (raw[0] | 0x02) & 0xFE
    return ":".join(f"{b:02x}" for b in (first, *raw[1:]))


async def plug(machine_id: str, nic_name: str, network_id: str) -> str:
    """The NIC's tap, created if missing, up and a port of its network's bridge (created if
    missing). Returns the tap's name.

    :raises Internal: netlink refused.
    """
    bridge, name = bridge_name(network_id), tap_name(machine_id, nic_name)
    await asyncio.to_thread(_ensure_tap, name)
    try:
        await netns.on_netlink_loop(_join, bridge, name)
    except Exception as exc:  # pyroute2 raises NetlinkError and OSError subclasses
        raise Internal(f"nic {nic_name}: cannot join {name} to bridge {bridge}: {exc}") from exc
    log.info("machine nic plugged machine=%s nic=%s tap=%s bridge=%s network=%s",
             machine_id, nic_name, name, bridge, network_id)
    return name


async def open_tap(name: str) -> int:
    """An fd on the tap for QEMU (close it once QEMU has its copy)."""
    try:
        return await asyncio.to_thread(_open_existing, name)
    except OSError as exc:
        raise Internal(f"open tap {name}: {exc}") from exc


async def unplug(machine_id: str, nic_name: str, network_id: str) -> None:
    """Remove the NIC's tap, and its bridge once no port is left on it. Idempotent."""
    bridge, name = bridge_name(network_id), tap_name(machine_id, nic_name)
    try:
        await netns.on_netlink_loop(_remove, bridge, name)
    except Exception as exc:
        raise Internal(f"nic {nic_name}: cannot remove {name}: {exc}") from exc
    log.info("machine nic unplugged machine=%s nic=%s tap=%s", machine_id, nic_name, name)


async def unplug_tap(machine_id: str, nic_name: str) -> None:
    """Remove the NIC's tap when its network is no longer known (and its bridge if that was
    the last port). Idempotent."""
    name = tap_name(machine_id, nic_name)
    try:
        await netns.on_netlink_loop(_remove_by_tap, name)
    except Exception as exc:
        raise Internal(f"nic {nic_name}: cannot remove {name}: {exc}") from exc


async def _remove_by_tap(name: str) -> None:
    async with netns.rtnl(None) as ipr:
        port = await ipr.link_lookup(ifname=name)
        if not port:
            return
        link = (await tap.collect(await ipr.link("get", index=port[0])))[0]
        master = link.get("IFLA_MASTER")
        bridge = ""
        if master:
            bridge = (await tap.collect(await ipr.link("get", index=master)))[0].get(
                "IFLA_IFNAME", "")
    await _remove(bridge, name)


def _exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _ensure_tap(name: str) -> None:
    if not _exists(name):
        tap.create_persistent_tap(name)


def _open_existing(name: str) -> int:
    # TUNSETIFF would make a fresh tap, on no bridge, if ours were gone: check first.
    if not _exists(name):
        raise FileNotFoundError(f"no interface {name}")
    return tap.tun_open(name)


async def _join(bridge: str, name: str) -> None:
    async with netns.rtnl(None) as ipr:
        found = await ipr.link_lookup(ifname=bridge)
        if not found:
            with contextlib.suppress(Exception):  # a concurrent plug made it first
                await ipr.link("add", ifname=bridge, kind="bridge")
            found = await ipr.link_lookup(ifname=bridge)
        await ipr.link("set", index=found[0], state="up")
        port = await ipr.link_lookup(ifname=name)
        await ipr.link("set", index=port[0], master=found[0], state="up")


async def _remove(bridge: str, name: str) -> None:
    async with netns.rtnl(None) as ipr:
        port = await ipr.link_lookup(ifname=name)
        if port:
            await ipr.link("del", index=port[0])
        found = await ipr.link_lookup(ifname=bridge) if bridge.startswith(BRIDGE_PREFIX) else []
        if not found:
            return
        links = await tap.collect(await ipr.link("dump"))
        if not any(link.get("IFLA_MASTER") == found[0] for link in links):
            await ipr.link("del", index=found[0])
