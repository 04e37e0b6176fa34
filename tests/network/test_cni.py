"""CNI runner: config loading, result parsing, and ADD/CHECK/DEL with Debian's real plugins in
real network namespaces."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from criserver import files
from criserver.config import NetworkConfig
from criserver.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from criserver.network import netns
from criserver.network.cni import (
    CniManager,
    CniPluginError,
    CniResult,
    ConfigList,
    DefaultNetwork,
    PodRef,
    PortMapping,
    default_conflist,
    parse_cidrs,
)
from tests.network.test_network_support import (
    CNI_BIN,
    NetEnv,
    chains_of,
    gone,
    in_netns,
    nat_rules,
    needs_root_cni,
    net_env,
    read,
)

_ = net_env  # a fixture: used by name

RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 2},
        {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 2},
        {"address": "10.1.0.1/24", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
    "dns": {},
}


def pod(pod_id: str = "pod1") -> PodRef:
    return PodRef(pod_id, "web", "default", "uid-" + pod_id)


# -- units -----------------------------------------------------------------------------------


def test_result_parse_picks_the_pod_interface_ipv4_first() -> None:
    result = CniResult.parse(RESULT_1_0)
    assert result.pod_ips("eth0") == ["10.1.0.5", "fd00::5"]
    assert result.pod_addresses("eth0") == ["10.1.0.5/24", "fd00::5/64"]
    assert result.routes[1].gw == "fd00::1"


def test_result_parse_old_layout_and_garbage() -> None:
    old = CniResult.parse(
        {"cniVersion": "0.2.0", "ip4": {"ip": "10.2.0.7/16", "routes": [{"dst": "0.0.0.0/0"}]}}
    )
    assert old.pod_ips() == ["10.2.0.7"]
    with pytest.raises(ValueError):
        CniResult.parse({"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]})


def test_config_list_accepts_conf_and_conflist_rejects_broken() -> None:
    single = ConfigList.from_dict({"cniVersion": "0.4.0", "name": "n", "type": "bridge"}, "f")
    assert single.plugins[0]["type"] == "bridge" and single.name == "n"
    listed = ConfigList.from_dict(
        {
            "cniVersion": "1.0.0",
            "name": "n",
            "disableCheck": True,
            "plugins": [{"type": "ptp"}, {"type": "portmap"}],
        },
        "f",
    )
    assert listed.disable_check and [p["type"] for p in listed.plugins] == ["ptp", "portmap"]
    for broken in (
        {"name": "n", "plugins": [{"type": "x"}]},
        {"cniVersion": "1.0.0"},
        {"cniVersion": "1.0.0", "name": "n", "plugins": []},
        [1, 2],
    ):
        with pytest.raises(ValueError):
            ConfigList.from_dict(broken, "f")


def test_default_conflist_shape_and_dual_stack() -> None:
    conf = default_conflist(["10.5.0.0/24", "fd00:5::/64"], DefaultNetwork("n", "br9", None))
    bridge, portmap = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["isGateway"] and bridge["ipMasq"]
    assert bridge["bridge"] == "br9" and "dataDir" not in bridge["ipam"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.5.0.0/24"}], [{"subnet": "fd00:5::/64"}]]
    assert {r["dst"] for r in bridge["ipam"]["routes"]} == {"0.0.0.0/0", "::/0"}
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    assert parse_cidrs("10.9.0.0/16, fd00::/64") == ["10.9.0.0/16", "fd00::/64"]
    with pytest.raises(InvalidArgument):
        parse_cidrs("10.9.0.0/33")


@needs_root_cni
async def test_status_reports_missing_plugins_and_broken_configs(
    net_env: NetEnv, tmp_path: Path
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    status = await net_env.cni(bin_dirs=[str(empty_bin)]).status()
    assert not status.ready and status.reason == "NetworkPluginNotReady"
    assert "bridge" in status.message and "loopback" in status.message
    assert (await net_env.cni().status()).ready
    (net_env.conf_dir / "10-broken.conflist").write_text("{not json")
    status = await net_env.cni().status()
    assert not status.ready and "10-broken.conflist" in status.message
    (net_env.conf_dir / "20-ok.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "ok", "plugins": [{"type": "nosuchplugin"}]})
    )
    status = await net_env.cni().status()
    assert not status.ready and "nosuchplugin" in status.message


async def test_pod_cidr_is_persisted_and_used_by_the_builtin_network(net_env: NetEnv) -> None:
    cni = net_env.cni()
    conf, _ = await cni.current_config()
    assert conf is not None and conf.source == "built-in"
    assert conf.plugins[0]["ipam"]["ranges"] == [[{"subnet": net_env.subnet}]]
    await cni.set_pod_cidr("10.77.3.0/24")
    await cni.set_pod_cidr("")  # kubelet sends empty strings too: ignored
    conf, _ = await net_env.cni().current_config()  # a restarted daemon reads it back
    assert conf is not None and conf.plugins[0]["ipam"]["ranges"] == [[{"subnet": "10.77.3.0/24"}]]
    with pytest.raises(InvalidArgument):
        await cni.set_pod_cidr("bogus")


# -- real plugins ----------------------------------------------------------------------------


@needs_root_cni
async def test_add_check_del_with_builtin_network(net_env: NetEnv) -> None:
    cni = net_env.cni()
    path = net_env.netns_dir / "pod1"
    await netns.create(path)
    result = await cni.add(pod(), str(path))
    [ip] = result.pod_ips()
    assert ip.startswith(net_env.subnet.rsplit(".", 2)[0])
    assert ip in await in_netns(path, "ip", "-4", "addr", "show", "dev", "eth0")
    assert "UP" in await in_netns(path, "ip", "link", "show", "lo")  # the loopback network
    assert net_env.allocations() == [ip]
    assert (await cni.result("pod1")) == result
    await cni.check("pod1", str(path))
    # Masquerade rules of the bridge plugin carry our network name and the pod id.
    assert any("pod1" in r for r in await net_env.our_rules())

    await cni.delete("pod1", str(path))
    assert net_env.allocations() == []
    assert await net_env.our_rules() == []
    assert await cni.result("pod1") is None
    assert "eth0" not in await in_netns(path, "ip", "link")
    await cni.delete("pod1", str(path))  # idempotent
    await netns.remove(path)


@needs_root_cni
async def test_conflist_file_in_conf_dir_wins(net_env: NetEnv) -> None:
    # ptp, not the built-in bridge: proves the file was used. Prefixed so it sorts first.
    conf = {
        "cniVersion": "1.0.0",
        "name": net_env.name,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": True,
                "mtu": 1400,
                "ipam": {
                    "type": "host-local",
                    "subnet": net_env.subnet,
                    "dataDir": str(net_env.ipam_dir),
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (net_env.conf_dir / "10-test.conflist").write_text(json.dumps(conf))
    (net_env.conf_dir / "99-other.conf").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "other", "type": "nosuchplugin"})
    )
    cni = net_env.cni()
    assert (await cni.status()).ready
    path = net_env.netns_dir / "pod2"
    await netns.create(path)
    result = await cni.add(pod("pod2"), str(path))
    assert "mtu 1400" in await in_netns(path, "ip", "link", "show", "eth0")
    assert gone(f"/sys/class/net/{net_env.bridge}")  # no bridge was made
    assert len(result.pod_ips()) == 1
    # The config is cached with the result: DEL still works after the file is gone.
    (net_env.conf_dir / "10-test.conflist").unlink()
    await cni.delete("pod2", str(path))
    assert net_env.allocations() == [] and await net_env.our_rules() == []
    await netns.remove(path)


@needs_root_cni
async def test_plugin_error_is_reported_and_add_rolls_back(net_env: NetEnv) -> None:
    net_env.write_failing_conflist()
    cni = net_env.cni()
    path = net_env.netns_dir / "pod3"
    await netns.create(path)
    with pytest.raises(CniPluginError) as info:
        await cni.add(pod("pod3"), str(path))
    err = info.value
    assert err.plugin == "bridge" and err.command == "ADD" and err.cni_code is not None
    assert "pod=pod3" in err.message and err.msg
    assert await cni.result("pod3") is None
    assert not (net_env.cache_dir / "results" / "pod3.json").exists()
    assert net_env.allocations() == []
    await netns.remove(path)


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@needs_root_cni
async def test_protocol_env_stdin_chaining_and_capabilities(
    net_env: NetEnv, tmp_path: Path
) -> None:
    # A recording plugin after the real bridge: it sees exactly what the runner passes.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record"
    recorder = bindir / "recorder"
    recorder.write_text(f"""#!/usr/bin/python3
import json, os, sys
data = sys.stdin.read()
command = os.environ["CNI_COMMAND"]
with open("{record}." + command + ".stdin", "w") as f:
    f.write(data)
with open("{record}." + command + ".env", "w") as f:
    f.writelines(f"{{k}}={{v}}\\n" for k, v in sorted(os.environ.items()) if k.startswith("CNI_"))
if command == "ADD":
    print(json.dumps(json.loads(data)["prevResult"]))
""")
    recorder.chmod(0o755)
    conf = {
        "cniVersion": "1.0.0",
        "name": net_env.name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": net_env.bridge,
                "isGateway": True,
                "ipam": {
                    "type": "host-local",
                    "subnet": net_env.subnet,
                    "dataDir": str(net_env.ipam_dir),
                },
            },
            {"type": "recorder", "capabilities": {"portMappings": True}, "custom": 7},
            {"type": "recorder", "capabilities": {"bandwidth": True}},
        ],
    }
    (net_env.conf_dir / "10-rec.conflist").write_text(json.dumps(conf))
    cni = net_env.cni(bin_dirs=[CNI_BIN, str(bindir)])
    path = net_env.netns_dir / "pod4"
    await netns.create(path)
    mapping = PortMapping(host_port=18081, container_port=80, protocol="TCP")
    result = await cni.add(pod("pod4"), str(path), [mapping, PortMapping(0, 81)])
    env = dict(line.split("=", 1) for line in read(f"{record}.ADD.env").splitlines())
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_CONTAINERID"] == "pod4"
    assert env["CNI_NETNS"] == str(path) and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == f"{CNI_BIN}:{bindir}"
    assert env["CNI_ARGS"] == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=pod4;K8S_POD_UID=uid-pod4"
    )
    # The last recorder (no portMappings capability) got no runtimeConfig, but the bridge's
    # result as prevResult, chained through the first recorder's output.
    last = json.loads(read(f"{record}.ADD.stdin"))
    assert last["name"] == net_env.name and last["cniVersion"] == "1.0.0"
    assert "runtimeConfig" not in last
    assert last["prevResult"]["ips"][0]["address"].split("/")[0] == result.pod_ips()[0]

    await cni.delete("pod4", str(path))
    # DEL runs in reverse order: the first recorder (declares portMappings) runs last of the
    # two, and gets the runtimeConfig (hostPort 0 dropped) and the cached prevResult.
    deleted = json.loads(read(f"{record}.DEL.stdin"))
    assert deleted["custom"] == 7
    assert deleted["runtimeConfig"] == {
        "portMappings": [{"hostPort": 18081, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]
    }
    assert deleted["prevResult"]["ips"] == result.raw["ips"]
    assert net_env.allocations() == []
    await netns.remove(path)


@needs_root_cni
async def test_hung_plugin_times_out_and_is_killed(net_env: NetEnv, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pidfile = tmp_path / "pid"
    _script(bindir / "hang", f'echo $$ > {pidfile}\n[ "$CNI_COMMAND" = ADD ] && exec sleep 600\n')
    (net_env.conf_dir / "10-hang.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": net_env.name, "plugins": [{"type": "hang"}]})
    )
    cni = net_env.cni(bin_dirs=[CNI_BIN, str(bindir)], timeout=1.0)
    path = net_env.netns_dir / "pod5"
    await netns.create(path)
    with pytest.raises(DeadlineExceeded):
        await cni.add(pod("pod5"), str(path))
    pid = int(read(pidfile))
    assert gone(f"/proc/{pid}") or " Z " in read(f"/proc/{pid}/stat")
    assert await cni.result("pod5") is None  # rolled back (DEL of "hang" returns at once)
    await netns.remove(path)


@needs_root_cni
async def test_hostport_rules_present_after_add_gone_after_del(net_env: NetEnv) -> None:
    cni = net_env.cni()
    path = net_env.netns_dir / "pod6"
    await netns.create(path)
    await cni.add(pod("pod6"), str(path), [PortMapping(18090, 8080, "udp")])
    rules = await nat_rules()
    dnat = [r for r in rules if "--dports 18090" in r and net_env.name in r]
    assert dnat and "-p udp" in dnat[0]
    chains = chains_of(rules, "pod6")
    assert any(c.startswith("CNI-DN-") for c in chains)
    await cni.delete("pod6", str(path))
    rules = await nat_rules()
    assert not [r for r in rules if "18090" in r]
    left = {r.split()[1] for r in rules if r.startswith("-N ")} & chains
    assert not left, f"chains left: {left}"
    await netns.remove(path)


@needs_root_cni
async def test_add_without_config_fails_cleanly(net_env: NetEnv) -> None:
    (net_env.conf_dir / "10-broken.conf").write_text("nope")
    cni: CniManager = net_env.cni()
    with pytest.raises(FailedPrecondition):
        await cni.add(pod("pod7"), "/nonexistent")


async def test_delete_removes_a_cache_entry_a_crash_left_half_written(tmp_path: Path) -> None:
    # A crash while ADD wrote its first cache entry: no entry, only the temp file beside it.
    cni = CniManager(NetworkConfig(cni_conf_dir=str(tmp_path / "conf")), tmp_path / "cache")
    left = files.temp_name(tmp_path / "cache" / "results" / "pod9.json")
    left.parent.mkdir(parents=True)
    left.write_text('{"kind": "criserver-cni-ca')
    await cni.delete("pod9", None)
    assert list(left.parent.iterdir()) == []
