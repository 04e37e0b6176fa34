"""The guest's network configuration from the pod's CNI result (pure parts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.network import device_with_mac, ip_commands


def test_commands_for_a_dual_stack_interface() -> None:
    iface = pb.Interface(
        name="eth0", mac="02:aa:bb:cc:dd:ee", mtu=1450,
        addresses=["10.88.0.5/16", "fd00::5/64"],
        routes=[pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1"),
                pb.Route(destination="fd00::/8")],
    )
    assert ip_commands(iface, "enp0s1") == [
        ["ip", "link", "set", "dev", "lo", "up"],
        ["ip", "link", "set", "dev", "enp0s1", "mtu", "1450"],
        ["ip", "-4", "addr", "add", "10.88.0.5/16", "dev", "enp0s1"],
        ["ip", "-6", "addr", "add", "fd00::5/64", "dev", "enp0s1"],
        ["ip", "link", "set", "dev", "enp0s1", "up"],
        ["ip", "-4", "route", "add", "default", "via", "10.88.0.1", "dev", "enp0s1"],
        ["ip", "-6", "route", "add", "fd00::/8", "dev", "enp0s1"],
    ]


def test_device_found_by_mac(tmp_path: Path) -> None:
    for dev, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "02:AA:bb:cc:dd:ee")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "address").write_text(mac + "\n")
    assert device_with_mac("02:aa:bb:cc:dd:ee", str(tmp_path)) == "eth0"
    with pytest.raises(GRPCError):
        device_with_mac("02:00:00:00:00:99", str(tmp_path))


def test_device_booted_with_another_mac_gets_the_pod_mac() -> None:
    iface = pb.Interface(name="eth0", mac="0a:58:0a:01:02:03", device_mac="02:00:aa:bb:cc:dd",
                         addresses=["10.1.2.3/24"])
    assert ip_commands(iface, "eth0")[:2] == [
        ["ip", "link", "set", "dev", "lo", "up"],
        ["ip", "link", "set", "dev", "eth0", "address", "0a:58:0a:01:02:03"],
    ]
