"""Pod networking on the host: netns lifecycle, the tap + tc redirect, the composed PodNetwork,
and leaks, all on real network namespaces with Debian's CNI plugins."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import shutil
import socket
import struct
import threading
from pathlib import Path

import pytest

from criserver.errors import AlreadyExists, NotFound
from criserver.network import netns
from criserver.network.cni import PodRef, PortMapping
from criserver.network.pod import Attachment, PodNetwork
from criserver.vm import tap
from criserver.vm.qemu import TapNic, nic_args
from criserver.vm.tap import GuestInterface, GuestRoute, collect
from tests.network.test_network_support import (
    NetEnv,
    chains_of,
    gone,
    host_links,
    in_netns,
    nat_rules,
    needs_root_cni,
    net_env,
    ping,
)

_ = net_env  # a fixture: used by name

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@needs_root
async def test_netns_create_enter_remove(tmp_path: Path) -> None:
    directory = tmp_path / "netns"
    path = directory / "p1"
    try:
        await netns.create(path)
        assert netns.is_netns(path)
        with pytest.raises(AlreadyExists):
            await netns.create(path)
        async with netns.rtnl(path) as ipr:
            names = [link.get("ifname") for link in await collect(await ipr.link("dump"))]
        assert names == ["lo"]
        # run_in runs on a thread inside the netns: its netns inode differs from ours.
        inner = await netns.run_in(path, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inner == os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino
        await netns.remove(path)
        await netns.remove(path)  # idempotent
        assert not path.exists() and not netns.is_netns(path)
        with pytest.raises(NotFound):
            await netns.run_in(path, lambda: None)
    finally:
        await netns.remove(path)
        await netns.release_dir(directory)
    assert not directory.exists()



@needs_root
async def test_netns_moves_with_what_lives_in_it(tmp_path: Path) -> None:
    directory = tmp_path / "netns"
    source, target = directory / "pool-1", directory / "pod-1"
    try:
        await netns.create(source)
        inode = os.stat(source).st_ino
        await tap.create_tap(source)  # what a pooled VM's netns holds
        await netns.move(source, target)
        assert not source.exists() and os.stat(target).st_ino == inode
        async with netns.rtnl(target) as ipr:
            names = {link.get("ifname") for link in await collect(await ipr.link("dump"))}
        assert tap.TAP_NAME in names
        with pytest.raises(NotFound):
            await netns.move(source, directory / "other")
        assert not (directory / "other").exists()
        await netns.create(source)
        with pytest.raises(AlreadyExists):
            await netns.move(source, target)
        assert netns.is_netns(source)  # left as it was
    finally:
        for path in (source, target):
            await netns.remove(path)
        await netns.release_dir(directory)


@needs_root
async def test_pin_ipc_and_uts_namespaces(tmp_path: Path) -> None:
    directory = tmp_path / "ns"
    ipc, uts = directory / "ipc", directory / "uts"
    try:
        await netns.pin(ipc, "ipc")
        await netns.pin(uts, "uts", hostname="pinned-pod")
        assert os.stat(ipc).st_ino != os.stat("/proc/self/ns/ipc").st_ino
        assert os.stat(uts).st_ino != os.stat("/proc/self/ns/uts").st_ino

        def hostname_inside() -> str:
            fd = os.open(uts, os.O_RDONLY)
            try:
                assert ctypes.CDLL(None).setns(fd, netns.CLONE_NEWUTS) == 0
            finally:
                os.close(fd)
            return socket.gethostname()

        assert await netns.run_on_fresh_thread(hostname_inside) == "pinned-pod"
        assert socket.gethostname() != "pinned-pod"
        with pytest.raises(AlreadyExists):
            await netns.pin(ipc, "ipc")
        with pytest.raises(ValueError):
            await netns.pin(directory / "pid", "pid")
    finally:
        for path in (ipc, uts):
            await netns.remove(path)
        await netns.release_dir(directory)
    assert not directory.exists()


async def _cni_pod(env: NetEnv, pod_id: str) -> tuple[Path, str]:
    cni = env.cni()
    path = env.netns_dir / pod_id
    await netns.create(path)
    result = await cni.add(PodRef(pod_id, pod_id, "default", "uid"), str(path))
    return path, result.pod_ips()[0]


@needs_root_cni
async def test_two_pods_talk_through_the_bridge(net_env: NetEnv) -> None:
    a, ip_a = await _cni_pod(net_env, "pa")
    b, ip_b = await _cni_pod(net_env, "pb")
    assert ip_a != ip_b
    assert await ping(a, ip_b) and await ping(b, ip_a)


@needs_root_cni
async def test_take_over_installs_tap_and_redirects(net_env: NetEnv) -> None:
    path, ip = await _cni_pod(net_env, "pt")
    before = await in_netns(path, "ip", "-j", "link", "show", "eth0")
    mac = json.loads(before)[0]["address"]
    info, guest = await tap.take_over(path)
    assert (info.name, info.mac, info.mtu) == ("tap0", mac, 1500)
    gateway = net_env.subnet.rsplit(".", 1)[0] + ".1"
    assert guest == GuestInterface(
        "eth0", mac, 1500, [f"{ip}/24"], [GuestRoute("0.0.0.0/0", gateway)]
    )
    async with netns.rtnl(path) as ipr:
        eth0 = (await ipr.link_lookup(ifname="eth0"))[0]
        tap0 = (await ipr.link_lookup(ifname="tap0"))[0]
        assert await collect(await ipr.addr("dump", index=eth0)) == []  # flushed
        for src, dst in ((eth0, tap0), (tap0, eth0)):
            qdiscs = await collect(await ipr.get_qdiscs(index=src))
            assert any(q.get("TCA_KIND") == "ingress" for q in qdiscs)
            filters = await collect(await ipr.get_filters(index=src, parent=0xFFFF0000))
            assert _mirred_targets(filters) == [dst]
        link = (await collect(await ipr.link("get", index=tap0)))[0]
        assert link.get("IFLA_MTU") == 1500 and link["flags"] & 1  # IFF_UP
    # The tap fd for QEMU attaches to this tap, and only to an existing one.
    fd = await tap.open_tap_fd(path)
    os.close(fd)
    with pytest.raises(NotFound):
        await tap.open_tap_fd(path, "tap9")


def _mirred_targets(filters: list[object]) -> list[int]:
    targets = []
    for f in filters:
        options = f.get_attr("TCA_OPTIONS")  # type: ignore[attr-defined]
        acts = options.get_attr("TCA_U32_ACT") if options else None
        if not acts:
            continue
        for _, act in acts["attrs"]:
            if act.get_attr("TCA_ACT_KIND") == "mirred":
                parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
                assert parms["eaction"] == 1  # TCA_EGRESS_REDIR
                targets.append(int(parms["ifindex"]))
    return targets


# -- a stand-in guest on the tap fd: answers ARP and ping for the pod IP -------------------

VNET_HDR = 10  # struct virtio_net_hdr: the tap was made with IFF_VNET_HDR


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _answer(frame: bytes, mac: bytes, ip: bytes) -> bytes | None:
    dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0806 and frame[20:22] == b"\0\1" and frame[38:42] == ip:
        sender_mac, sender_ip = frame[22:28], frame[28:32]
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + ip + sender_mac + sender_ip
        return src + mac + b"\x08\x06" + arp
    if ethertype == 0x0800 and dst == mac and frame[23] == 1 and frame[30:34] == ip:
        ihl = (frame[14] & 0xF) * 4
        icmp = bytearray(frame[14 + ihl :])
        if icmp[0] != 8:
            return None
        icmp[0], icmp[2:4] = 0, b"\0\0"
        icmp[2:4] = struct.pack("!H", _csum(bytes(icmp)))
        header = bytearray(frame[14 : 14 + ihl])
        header[12:16], header[16:20], header[10:12] = frame[30:34], frame[26:30], b"\0\0"
        header[10:12] = struct.pack("!H", _csum(bytes(header)))
        return src + mac + b"\x08\x00" + bytes(header) + bytes(icmp)
    return None


def _fake_guest(fd: int, mac: str, ip: str, stop: threading.Event) -> int:
    mac_b, ip_b, answered = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(ip), 0
    while not stop.is_set():
        if not select.select([fd], [], [], 0.1)[0]:
            continue
        frame = os.read(fd, 65536)[VNET_HDR:]
        reply = _answer(frame, mac_b, ip_b)
        if reply is not None:
            os.write(fd, bytes(VNET_HDR) + reply)
            answered += 1
    return answered


@needs_root_cni
async def test_traffic_crosses_the_redirect_both_ways(net_env: NetEnv) -> None:
    client, _ = await _cni_pod(net_env, "pc")
    server, server_ip = await _cni_pod(net_env, "ps")
    info, guest = await tap.take_over(server)
    # The netns no longer owns the IP: nothing answers until a "guest" holds the tap.
    assert not await ping(client, server_ip, count=1)
    fd = await tap.open_tap_fd(server)
    stop = threading.Event()
    answering = asyncio.ensure_future(asyncio.to_thread(_fake_guest, fd, info.mac, server_ip, stop))
    try:
        assert await ping(client, server_ip)
    finally:
        stop.set()
        answered = await answering
        os.close(fd)
    assert answered >= 1  # the echo reply came from the tap, through eth0's redirect
    assert guest.addresses == [f"{server_ip}/24"]


@needs_root_cni
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs QEMU")
async def test_qemu_attaches_to_the_tap_fd(net_env: NetEnv, tmp_path: Path) -> None:
    path, _ = await _cni_pod(net_env, "pq")
    info, _ = await tap.take_over(path)
    assert "NO-CARRIER" in await in_netns(path, "ip", "link", "show", "tap0")
    fd = await tap.open_tap_fd(path)
    try:
        qemu = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64",
            "-M",
            "microvm",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            *nic_args(TapNic(fd, info.mac, info.mtu)),
            pass_fds=(fd,),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(fd)  # QEMU holds its own copy
    try:
        for _ in range(100):
            out = await in_netns(path, "ip", "link", "show", "tap0")
            if "LOWER_UP" in out or qemu.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert qemu.returncode is None, (await qemu.stderr.read()).decode()  # type: ignore[union-attr]
        assert "LOWER_UP" in out
    finally:
        with contextlib.suppress(ProcessLookupError):
            qemu.kill()
        await qemu.wait()
    # The tap is persistent: it outlives QEMU (a restarted VM attaches to the same one).
    assert "NO-CARRIER" in await in_netns(path, "ip", "link", "show", "tap0")


async def attach(net: PodNetwork, pod_id: str, *mappings: PortMapping) -> Attachment:
    """A pod's network as a backend makes it: the netns, then CNI ADD in it."""
    await net.prepare(pod_id)
    return await net.connect(pod_id, pod_id, "default", f"uid-{pod_id}", mappings)


@needs_root_cni
async def test_pod_network_setup_and_teardown(net_env: NetEnv) -> None:
    net = net_env.pod_network()
    assert (await net.status()).ready
    att = await attach(net, "pod1", PortMapping(18095, 80))
    assert att.netns == net_env.netns_dir / "pod1" and netns.is_netns(att.netns)
    assert att.ifname == "eth0" and net_env.allocations() == att.ips
    rules = await nat_rules()
    assert [r for r in rules if "--dports 18095" in r]
    chains = chains_of(rules, "pod1")
    assert len(chains) >= 2  # masquerade + hostport DNAT
    with pytest.raises(AlreadyExists):
        await net.prepare("pod1")
    # A VM backend's part: the interface's addresses carried to a tap; DEL still cleans up.
    await tap.create_tap(att.netns)
    tap_info, guest = await tap.take_over(att.netns, att.ifname)
    assert guest.addresses == [f"{att.ips[0]}/24"] and guest.mac == tap_info.mac
    assert await net.teardown("pod1")
    assert not await net.teardown("pod1")  # idempotent, and says there was nothing left
    assert gone(att.netns) and net_env.allocations() == []
    rules = await nat_rules()
    assert await net_env.our_rules() == [] and not [r for r in rules if "18095" in r]
    assert not {r.split()[1] for r in rules if r.startswith("-N ")} & chains
    assert not await net.teardown("never-created")


@needs_root_cni
async def test_a_host_backend_uses_the_netns_as_cni_made_it(net_env: NetEnv) -> None:
    net = net_env.pod_network()
    att = await attach(net, "pod4")
    await net.check("pod4")  # CNI CHECK: as ADD left it
    addresses = await in_netns(att.netns, "ip", "-4", "addr", "show", "eth0")
    assert f"inet {att.ips[0]}/24" in addresses
    assert await net.teardown("pod4")  # no tap involved
    assert gone(att.netns) and net_env.allocations() == []


@needs_root_cni
async def test_teardown_when_the_netns_is_already_gone(net_env: NetEnv) -> None:
    net = net_env.pod_network()
    att = await attach(net, "pod2", PortMapping(18096, 80))
    await netns.remove(att.netns)  # e.g. removed by hand, or a crash mid-teardown
    assert await net.teardown("pod2")  # the CNI side was still there
    assert gone(att.netns) and net_env.allocations() == []
    assert await net_env.our_rules() == []
    assert not [r for r in await nat_rules() if "18096" in r]


@needs_root_cni
async def test_failed_add_leaves_only_the_netns_teardown_removes(net_env: NetEnv) -> None:
    net = net_env.pod_network()
    net_env.write_failing_conflist()  # nothing may stay behind
    with pytest.raises(Exception, match="failed to create bridge"):
        await attach(net, "pod3")
    assert await net.cni.result("pod3") is None and net_env.allocations() == []
    await net.teardown("pod3")
    assert gone(net_env.netns_dir / "pod3")


@needs_root_cni
async def test_no_leaks_after_many_cycles(net_env: NetEnv) -> None:
    """What the test's own pods made goes again: their host-side veths (the ports of this
    test's bridge), their iptables rules (they carry the test's network name) and the chains
    those jump to. Only what this test made is looked at: another CNI user on the host (a
    CRI daemon running pods) adds and removes rules and links of its own meanwhile."""
    net = net_env.pod_network()
    fds_before = len(os.listdir("/proc/self/fd"))
    ports: set[str] = set()
    chains: set[str] = set()
    for round_ in range(3):
        ids = [f"leak{round_}-{i}" for i in range(4)]
        await asyncio.gather(
            *(attach(net, i, PortMapping(19000 + n, 80)) for n, i in enumerate(ids))
        )
        assert len(net_env.allocations()) == 4
        made_ports = set(os.listdir(f"/sys/class/net/{net_env.bridge}/brif"))
        made_chains = chains_of(await nat_rules(), net_env.name)
        assert len(made_ports) == 4 and made_chains  # else the checks below would prove nothing
        ports |= made_ports
        chains |= made_chains
        await asyncio.gather(*(net.teardown(i) for i in ids))
    # The bridge stays (it is shared by all pods, like cni0); netns cleanup is asynchronous in
    # the kernel, so give the host-side veths a moment to go.
    for _ in range(50):
        left = ports & await host_links()
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == set()
    assert os.listdir(f"/sys/class/net/{net_env.bridge}/brif") == []
    assert os.listdir(net_env.netns_dir) == []
    assert net_env.allocations() == []
    assert os.listdir(net_env.cache_dir / "results") == []
    rules = await nat_rules()
    assert [r for r in rules if net_env.name in r] == []
    # The per-pod chains (the shared CNI-HOSTPORT-* ones stay) are gone, rules and all.
    assert {r for r in rules if r.split()[1:2] and r.split()[1] in chains} == set()
    assert len(os.listdir("/proc/self/fd")) <= fds_before
