"""Shared fixtures for the network tests: a private CNI world per test (unique bridge, network
name, subnet, conf/state/IPAM dirs) that is torn down even when the test fails.

Needs root, /usr/lib/cni (Debian's containernetworking-plugins) and iptables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from criserver.config import NetworkConfig
from criserver.network import netns
from criserver.network.cni import CniManager, DefaultNetwork
from criserver.network.pod import PodNetwork

CNI_BIN = "/usr/lib/cni"

needs_root_cni = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isfile(f"{CNI_BIN}/bridge") or not shutil.which("iptables"),
    reason="needs root, Debian's CNI plugins in /usr/lib/cni and iptables",
)


async def sh(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {text}")
    return text


async def in_netns(path: Path | str, *argv: str, check: bool = True) -> str:
    return await sh("nsenter", f"--net={path}", *argv, check=check)


async def ping(from_netns: Path | str, ip: str, count: int = 3) -> bool:
    """True when at least one echo reply came back (the first may be lost to ARP retries)."""
    out = await in_netns(
        from_netns, "busybox", "ping", "-c", str(count), "-W", "5", ip, check=False
    )
    return " 0 packets received" not in out and "packets received" in out


def gone(path: Path | str) -> bool:
    return not os.path.lexists(path)


def read(path: Path | str) -> str:
    return Path(path).read_text()


async def nat_rules() -> list[str]:
    return (await sh("iptables", "-w", "-t", "nat", "-S")).splitlines()


async def host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def chains_of(rules: list[str], marker: str) -> set[str]:
    """Per-pod chains jumped to from rules that carry marker (network name / pod id)."""
    chains = set()
    for rule in rules:
        if marker in rule and " -j CNI-" in rule:
            chain = rule.split(" -j ", 1)[1].split()[0]
            if not chain.startswith("CNI-HOSTPORT-"):  # shared by every pod: stays
                chains.add(chain)
    return chains


@dataclass
class NetEnv:
    root: Path
    tag: str
    name: str  # CNI network name: appears in every iptables comment of ours
    bridge: str
    subnet: str
    conf_dir: Path
    state_dir: Path
    cache_dir: Path
    ipam_dir: Path

    def cni(self, *, bin_dirs: list[str] | None = None, timeout: float = 60.0) -> CniManager:
        config = NetworkConfig(
            cni_bin_dirs=bin_dirs or [CNI_BIN],
            cni_conf_dir=str(self.conf_dir),
            default_subnet=self.subnet,
        )
        return CniManager(
            config,
            self.cache_dir,
            plugin_timeout=timeout,
            default_network=DefaultNetwork(self.name, self.bridge, str(self.ipam_dir)),
        )

    def pod_network(self, cni: CniManager | None = None) -> PodNetwork:
        return PodNetwork(cni or self.cni(), self.state_dir)

    @property
    def netns_dir(self) -> Path:
        return self.state_dir / "netns"

    def write_failing_conflist(self) -> None:
        """A conflist whose ADD fails after host-local has allocated (interface names have at
        most 15 bytes): what a failed ADD leaves is then visible."""
        conf = {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [{
                "type": "bridge",
                "bridge": "x" * 20,
                "ipam": {"type": "host-local", "subnet": self.subnet,
                         "dataDir": str(self.ipam_dir)},
            }],
        }
        (self.conf_dir / "10-bad.conflist").write_text(json.dumps(conf))

    def allocations(self) -> list[str]:
        """host-local's per-IP files (its lock and last-reserved files are not allocations)."""
        found = []
        for _, _, files in os.walk(self.ipam_dir):
            found += [f for f in files if f[0].isdigit() and not f.startswith("last_reserved")]
        return found

    async def our_rules(self) -> list[str]:
        return [r for r in await nat_rules() if self.name in r]


async def _cleanup(env: NetEnv) -> None:
    if env.netns_dir.is_dir():
        for entry in os.listdir(env.netns_dir):
            await netns.remove(env.netns_dir / entry)
        await netns.release_dir(env.netns_dir)
    rules = await nat_rules()
    chains = chains_of(rules, env.name)
    for rule in rules:
        if env.name in rule and rule.startswith("-A "):
            await sh("iptables", "-w", "-t", "nat", "-D", *shlex.split(rule[3:]), check=False)
    for chain in chains:
        await sh("iptables", "-w", "-t", "nat", "-F", chain, check=False)
        await sh("iptables", "-w", "-t", "nat", "-X", chain, check=False)
    await sh("ip", "link", "del", env.bridge, check=False)
    shutil.rmtree(env.root, ignore_errors=True)


@pytest.fixture
async def net_env(tmp_path: Path) -> AsyncIterator[NetEnv]:
    tag = secrets.token_hex(3)
    root = tmp_path / "net"
    env = NetEnv(
        root=root,
        tag=tag,
        name=f"crt-{tag}",
        bridge=f"crt{tag}",
        subnet=f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24",
        conf_dir=root / "conf",
        state_dir=root / "state",
        cache_dir=root / "cache",
        ipam_dir=root / "ipam",
    )
    env.conf_dir.mkdir(parents=True)
    try:
        yield env
    finally:
        with contextlib.suppress(Exception):
            await _cleanup(env)
