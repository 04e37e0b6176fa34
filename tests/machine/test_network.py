"""Machine NICs on real host interfaces: a bridge per network, a tap per NIC (needs root)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from criserver.errors import Internal
from criserver.machine import network

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates host interfaces")


def links() -> dict[str, dict[str, object]]:
    out = subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


async def test_taps_join_their_network_bridge_and_the_bridge_goes_with_the_last() -> None:
    net, other = f"net-{uuid.uuid4()}", f"net-{uuid.uuid4()}"
    bridge = network.bridge_name(net)
    try:
        a = await network.plug("machine-a", "eth0", net)
        b = await network.plug("machine-b", "eth0", net)
        c = await network.plug("machine-a", "eth1", other)
        assert len({a, b, c}) == 3 and all(len(name) <= 15 for name in (a, b, c, bridge))
        found = links()
        assert found[a]["master"] == bridge and found[b]["master"] == bridge
        assert found[c]["master"] == network.bridge_name(other)
        assert await network.plug("machine-a", "eth0", net) == a  # again: the same tap

        fd = await network.open_tap(a)
        os.close(fd)

        await network.unplug("machine-a", "eth0", net)
        assert a not in links() and bridge in links()
        await network.unplug("machine-b", "eth0", net)
        await network.unplug("machine-b", "eth0", net)  # idempotent
        assert b not in links() and bridge not in links()
        with pytest.raises(Internal):
            await network.open_tap(a)  # never a fresh tap on no bridge
    finally:
        for machine, nic, net_id in (("machine-a", "eth0", net), ("machine-b", "eth0", net),
                                     ("machine-a", "eth1", other)):
            await network.unplug(machine, nic, net_id)
    assert network.bridge_name(other) not in links()


def test_macs_are_stable_local_unicast_and_distinct() -> None:
    mac = network.mac_address("m", "eth0")
    assert mac == network.mac_address("m", "eth0") != network.mac_address("m", "eth1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
