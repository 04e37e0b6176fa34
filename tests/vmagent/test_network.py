"""The guest's network configuration from the pod's CNI result: the plan (pure), and the real
thing over netlink in a network namespace the test creates, checked with iproute2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.exceptions import GRPCError

from vmagent.api import agent_pb2 as pb
from vmagent.network import device_with_mac, plan

REPO = Path(__file__).resolve().parents[2]


def _described(iface: pb.Interface, dev: str) -> list[str]:
    return [what for what, *_ in plan(iface, dev)]


def test_plan_for_a_dual_stack_interface() -> None:
    iface = pb.Interface(
        name="eth0", mac="02:aa:bb:cc:dd:ee", mtu=1450,
        addresses=["10.88.0.5/16", "fd00::5/64"],
        routes=[pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1"),
                pb.Route(destination="fd00::/8")],
    )
    assert _described(iface, "enp0s1") == [
        "ip link set dev enp0s1 mtu 1450",
        "ip -4 addr add 10.88.0.5/16 dev enp0s1",
        "ip -6 addr add fd00::5/64 dev enp0s1",
        "ip link set dev enp0s1 up",
        "ip -4 route add default via 10.88.0.1 dev enp0s1",
        "ip -6 route add fd00::/8 dev enp0s1",
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
    assert _described(iface, "eth0")[0] == "ip link set dev eth0 address 0a:58:0a:01:02:03"


@pytest.mark.parametrize("bad", [
    pb.Interface(mac="02:00:00:00:00:01", addresses=["10.1.2.300/24"]),
    pb.Interface(mac="02:00:00:00:00:01", routes=[pb.Route(destination="10.0.0.0/8",
                                                           gateway="fd00::1")]),
    pb.Interface(mac="02:00:00:00:00:01", routes=[pb.Route(destination="nowhere")]),
])
def test_malformed_input_is_refused_before_any_change(bad: pb.Interface) -> None:
    with pytest.raises(ValueError):
        plan(bad, "eth0")


# --- over netlink, in a network namespace -----------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
MAC = "02:00:de:ad:be:01"
POD_MAC = "0a:58:0a:58:00:05"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"crinl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # A veth pair (this kernel has no dummy driver); its peer stays down, unused.
        subprocess.run(["ip", "-n", name, "link", "add", "dev", "eth7", "address", MAC,
                        "type", "veth", "peer", "name", "peer7"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _configure_in(netns: str, interfaces: list[pb.Interface]) -> subprocess.CompletedProcess[str]:
    """vmagent.network.configure run in `netns` (a process of its own: setns is per thread)."""
    blobs = [i.SerializeToString().hex() for i in interfaces]
    code = ("import sys; from vmagent.api import agent_pb2 as pb; "
            "from vmagent.network import configure; "
            "configure([pb.Interface.FromString(bytes.fromhex(h)) for h in sys.argv[1:]])")
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, *blobs],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def _ip_json(netns: str, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out) if out.strip() else []


@needs_root
def test_configure_applies_everything_over_netlink(netns: str) -> None:
    iface = pb.Interface(
        name="eth0", mac=POD_MAC, device_mac=MAC, mtu=1400,
        addresses=["10.88.0.5/16", "fd00:88::5/64"],
        routes=[pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1"),
                pb.Route(destination="192.168.7.0/24"),
                pb.Route(destination="::/0", gateway="fd00:88::1")])
    done = _configure_in(netns, [iface])
    assert done.returncode == 0, done.stderr
    (link,) = _ip_json(netns, "link", "show", "dev", "eth7")
    assert link["address"] == POD_MAC and link["mtu"] == 1400
    assert "UP" in link["flags"]  # type: ignore[operator]
    (lo,) = _ip_json(netns, "link", "show", "dev", "lo")
    assert "UP" in lo["flags"]  # type: ignore[operator]
    (addrs,) = _ip_json(netns, "addr", "show", "dev", "eth7")
    got = {(a["local"], a["prefixlen"]) for a in addrs["addr_info"]  # type: ignore[index,union-attr]
           if a.get("scope") == "global"}  # type: ignore[union-attr]
    assert got == {("10.88.0.5", 16), ("fd00:88::5", 64)}
    routes4 = _ip_json(netns, "-4", "route", "show", "dev", "eth7")
    # Main table, proto boot (which ip leaves out of its listing), as `ip route add` makes it.
    assert {"dst": "default", "gateway": "10.88.0.1"}.items() <= \
        next(r for r in routes4 if r["dst"] == "default").items()
    onlink = next(r for r in routes4 if r["dst"] == "192.168.7.0/24")
    assert onlink["scope"] == "link" and "gateway" not in onlink
    routes6 = _ip_json(netns, "-6", "route", "show", "dev", "eth7")
    assert any(r["dst"] == "default" and r.get("gateway") == "fd00:88::1" for r in routes6)
    # Applied twice (a retried SetupSandbox), what is there already is kept, not an error.
    again = _configure_in(netns, [iface])
    assert again.returncode == 0, again.stderr


@needs_root
def test_a_refused_step_is_named_with_the_kernels_reason(netns: str) -> None:
    # A gateway outside every connected network: the kernel answers ENETUNREACH.
    iface = pb.Interface(name="eth0", mac=MAC, addresses=["10.88.0.5/16"],
                         routes=[pb.Route(destination="0.0.0.0/0", gateway="172.31.0.1")])
    done = _configure_in(netns, [iface])
    assert done.returncode != 0
    assert "ip -4 route add default via 172.31.0.1 dev eth7" in done.stderr, done.stderr
    assert "Network is unreachable" in done.stderr, done.stderr
