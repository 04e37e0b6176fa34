"""CNI spec 1.0 runner: picks the network config, runs plugin chains for ADD/CHECK/DEL, and caches
each pod's ADD (config, arguments, result) under the root dir so DEL works after a restart.

With no config file in the conf dir, a built-in network (bridge + host-local + portmap) on the pod
CIDR is used. Loopback is always set up as its own network inside the pod netns.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criserver import files, spawn
from criserver.config import NetworkConfig
from criserver.errors import (
    CriError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
)
from criserver.network import plugin_leftovers
from criserver.network.netns import is_netns

log = logging.getLogger(__name__)

CNI_VERSION = "1.0.0"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
NOT_READY_REASON = "NetworkPluginNotReady"  # the reason kubelet expects in NetworkReady
LOOPBACK_NETWORK = {
    "cniVersion": CNI_VERSION,
    "name": "cni-loopback",
    "plugins": [{"type": "loopback"}],
}
# Results before 0.4.0 have no CHECK; before 0.3.0 they use the old ip4/ip6 layout.
_NO_CHECK_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1")


class CniPluginError(Internal):
    """A plugin failed: its CNI error (code, msg, details) or its exit status and stderr."""

    def __init__(
        self, plugin: str, command: str, pod_id: str, code: int | None, msg: str, details: str = ""
    ) -> None:
        text = f"CNI {command} pod={pod_id} plugin={plugin} failed"
        text += f": code={code} {msg}" if code is not None else f": {msg}"
        if details:
            text += f" ({details})"
        super().__init__(text)
        # cni_code, not code: `code` is the gRPC status every CriError carries.
        self.plugin, self.command, self.cni_code, self.msg, self.details = (
            plugin,
            command,
            code,
            msg,
            details,
        )


@dataclass(frozen=True)
class PortMapping:
    """One CRI PortMapping with a host port, in the portmap plugin's runtimeConfig shape."""

    host_port: int
    container_port: int
    protocol: str = "tcp"  # tcp, udp or sctp
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        return {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
            "hostIP": self.host_ip,
        }


@dataclass(frozen=True)
class PodRef:
    """What CNI needs to know about a pod."""

    id: str
    name: str
    namespace: str
    uid: str

    def cni_args(self) -> str:
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={self.id};K8S_POD_UID={self.uid}"
        )


@dataclass(frozen=True)
class CniInterface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None


@dataclass(frozen=True)
class CniIP:
    address: str  # with prefix: "10.88.0.5/16"
    gateway: str | None = None
    interface: int | None = None  # index into CniResult.interfaces


@dataclass(frozen=True)
class CniRoute:
    dst: str
    gw: str | None = None


@dataclass(frozen=True)
class CniResult:
    """A parsed ADD result (any version from 0.1.0 to 1.0.0); raw keeps the JSON as returned."""

    cni_version: str
    interfaces: list[CniInterface]
    ips: list[CniIP]
    routes: list[CniRoute]
    dns: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> CniResult:
        """:raises ValueError: not a CNI result."""
        try:
            result = cls._parse(raw)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a CNI result: {type(exc).__name__}: {exc}") from None
        for ip in result.ips:
            if not isinstance(ip.address, str):
                raise ValueError(f"not a CNI result: address {ip.address!r}")
            ipaddress.ip_interface(ip.address)  # validates
            if ip.interface is not None and (not isinstance(ip.interface, int)
                                             or isinstance(ip.interface, bool)):
                raise ValueError(f"not a CNI result: interface {ip.interface!r}")
        return result

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> CniResult:
        version = str(raw.get("cniVersion", ""))
        if "ip4" in raw or "ip6" in raw:  # 0.1.0 / 0.2.0
            ips, routes = [], []
            for key in ("ip4", "ip6"):
                if key in raw:
                    ips.append(CniIP(raw[key]["ip"], raw[key].get("gateway")))
                    routes += [CniRoute(r["dst"], r.get("gw")) for r in raw[key].get("routes", [])]
            return cls(version, [], ips, routes, raw.get("dns") or {}, raw)
        interfaces = [
            CniInterface(i["name"], i.get("mac", ""), i.get("sandbox", ""), i.get("mtu"))
            for i in raw.get("interfaces") or []
        ]
        ips = [
            CniIP(i["address"], i.get("gateway"), i.get("interface")) for i in raw.get("ips") or []
        ]
        routes = [CniRoute(r["dst"], r.get("gw")) for r in raw.get("routes") or []]
        return cls(version, interfaces, ips, routes, raw.get("dns") or {}, raw)

    def pod_addresses(self, ifname: str = "eth0") -> list[str]:
        """The pod's addresses with prefix, IPv4 first: those on ifname in the sandbox, or all
        addresses when the result does not say which interface holds them."""
        chosen = []
        for ip in self.ips:
            iface = (
                self.interfaces[ip.interface]
                if ip.interface is not None and 0 <= ip.interface < len(self.interfaces)
                else None
            )
            if iface is None or (iface.name == ifname and iface.sandbox):
                chosen.append(ipaddress.ip_interface(ip.address))
        chosen.sort(key=lambda a: a.version)
        return [str(a) for a in chosen]

    def pod_ips(self, ifname: str = "eth0") -> list[str]:
        """pod_addresses without the prefix: the IPs PodSandboxStatus reports."""
        return [a.split("/")[0] for a in self.pod_addresses(ifname)]


@dataclass(frozen=True)
class NetworkStatus:
    """For the CRI NetworkReady condition."""

    ready: bool
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class ConfigList:
    """A network configuration list, normalised from a .conflist or a single-plugin .conf."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    disable_check: bool
    source: str  # file path or "built-in"

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ConfigList:
        """:raises ValueError: not a usable config."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if "plugins" not in data:  # a .conf: one plugin, which carries name and cniVersion
            if "type" not in data:
                raise ValueError("neither 'plugins' nor 'type'")
            data = {
                "cniVersion": data.get("cniVersion", ""),
                "name": data.get("name"),
                "plugins": [data],
            }
        name, version, plugins = data.get("name"), data.get("cniVersion"), data.get("plugins")
        if not isinstance(name, str) or not name:
            raise ValueError("missing 'name'")
        if not isinstance(version, str) or not version:
            raise ValueError("missing 'cniVersion'")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("'plugins' is empty")
        for plugin in plugins:
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
                raise ValueError("a plugin has no 'type'")
        return cls(name, version, plugins, bool(data.get("disableCheck")), source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": self.plugins,
        }


@dataclass(frozen=True)
class DefaultNetwork:
    """Names used by the built-in network (tests use unique ones to stay off the host's)."""

    name: str = "criserver"
    bridge: str = "cri0"
    data_dir: str | None = None  # host-local allocations; None: /var/lib/cni/networks


def default_conflist(subnets: Sequence[str], net: DefaultNetwork) -> dict[str, Any]:
    """The built-in network: a bridge (gateway, masquerade) with host-local IPAM on the given
    subnets (one range set per subnet, so dual-stack works) and portmap for hostPorts."""
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": s}] for s in subnets],
        "routes": [
            {"dst": "::/0" if ipaddress.ip_network(s).version == 6 else "0.0.0.0/0"}
            for s in subnets
        ],
    }
    if net.data_dir:
        ipam["dataDir"] = net.data_dir
    return {
        "cniVersion": CNI_VERSION,
        "name": net.name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": ipam,
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def parse_cidrs(text: str) -> list[str]:
    """kubelet's pod CIDR: one CIDR or a comma-separated dual-stack pair.

    :raises InvalidArgument: not CIDRs.
    """
    try:
        nets = [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",")]
    except ValueError as exc:
        raise InvalidArgument(f"pod CIDR {text!r}: {exc}") from None
    return [str(n) for n in nets]


def _read_conf_dir(conf_dir: Path) -> tuple[ConfigList | None, list[str]]:
    """The first loadable config by file name, and the problems with those skipped."""
    problems: list[str] = []
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CONF_EXTENSIONS))
    except FileNotFoundError:
        return None, problems
    for name in names:
        path = conf_dir / name
        try:
            return ConfigList.from_dict(json.loads(path.read_bytes()), str(path)), problems
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    return None, problems


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


class CniManager:
    """Runs CNI for pods. State on disk under cache_dir (a directory of the persistent root):
    `pod-cidr` (set by UpdateRuntimeConfig) and `results/<pod id>.json` (one per added pod)."""

    def __init__(
        self,
        config: NetworkConfig,
        cache_dir: Path,
        *,
        default_network: DefaultNetwork | None = None,
        plugin_timeout: float = 60.0,
        ifname: str = "eth0",
    ) -> None:
        self._bin_dirs = list(config.cni_bin_dirs)
        self._conf_dir = Path(config.cni_conf_dir)
        self._default_subnets = parse_cidrs(config.default_subnet)
        self._default_network = default_network or DefaultNetwork()
        self._cache_dir = cache_dir
        self._timeout = plugin_timeout
        self.ifname = ifname
        self._pod_cidrs: list[str] | None = None  # loaded lazily from cache_dir
        self._leftovers_settled: asyncio.Future[None] | None = None

    # -- configuration ---------------------------------------------------------------------

    async def _subnets(self) -> list[str]:
        if self._pod_cidrs is None:
            saved = await asyncio.to_thread(_read_json, self._cache_dir / "pod-cidr")
            self._pod_cidrs = list(saved) if isinstance(saved, list) else []
        return self._pod_cidrs or self._default_subnets

    async def set_pod_cidr(self, cidr: str) -> None:
        """UpdateRuntimeConfig: the built-in network uses this CIDR for pods added from now on
        (pods already added keep their cached config). Persisted under cache_dir; "" is ignored.

        :raises InvalidArgument: not a CIDR.
        """
        if not cidr.strip():
            return
        cidrs = parse_cidrs(cidr)
        if cidrs == self._pod_cidrs:
            return
        await asyncio.to_thread(files.write_atomic, self._cache_dir / "pod-cidr",
                                json.dumps(cidrs), durable=True)
        self._pod_cidrs = cidrs
        log.info("pod CIDR set cidr=%s", ",".join(cidrs))

    async def current_config(self) -> tuple[ConfigList | None, list[str]]:
        """The network new pods get (None when the conf dir has only broken files) and the
        problems found with skipped files."""
        found, problems = await asyncio.to_thread(_read_conf_dir, self._conf_dir)
        if found is not None or problems:
            return found, problems
        conf = default_conflist(await self._subnets(), self._default_network)
        return ConfigList.from_dict(conf, "built-in"), []

    def find_plugin(self, plugin_type: str) -> str | None:
        for directory in self._bin_dirs:
            path = os.path.join(directory, plugin_type)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        return None

    async def status(self) -> NetworkStatus:
        """NetworkReady: a config loads and every plugin it (and loopback) names is installed."""
        conf, problems = await self.current_config()
        if conf is None:
            return NetworkStatus(
                False, NOT_READY_REASON, "no valid CNI network config: " + "; ".join(problems)
            )
        wanted = ["loopback"] + [p["type"] for p in conf.plugins]
        missing = await asyncio.to_thread(
            lambda: [t for t in wanted if self.find_plugin(t) is None]
        )
        if missing:
            return NetworkStatus(
                False,
                NOT_READY_REASON,
                f"CNI plugin(s) {', '.join(sorted(set(missing)))} not found in "
                f"{':'.join(self._bin_dirs)} (network {conf.source})",
            )
        return NetworkStatus(True)

    # -- pod operations --------------------------------------------------------------------

    def _cache_path(self, pod_id: str) -> Path:
        if not pod_id or "/" in pod_id or pod_id.startswith("."):
            raise InvalidArgument(f"bad pod id {pod_id!r}")
        return self._cache_dir / "results" / f"{pod_id}.json"

    async def add(
        self, pod: PodRef, netns: str, port_mappings: Sequence[PortMapping] = ()
    ) -> CniResult:
        """ADD: loopback network, then the pod network; returns the pod network's result.
        On failure every network is deleted again before the error is raised.

        :raises FailedPrecondition: no usable network config.
        :raises CniPluginError, DeadlineExceeded: a plugin failed or hung.
        """
        conf, problems = await self.current_config()
        if conf is None:
            raise FailedPrecondition("no valid CNI network config: " + "; ".join(problems))
        runtime_config = {"portMappings": [p.to_cni() for p in port_mappings if p.host_port]}
        entry: dict[str, Any] = {
            "kind": "criserver-cni-cache",
            "containerId": pod.id,
            "ifName": self.ifname,
            "cniArgs": pod.cni_args(),
            "runtimeConfig": runtime_config,
            "networks": [
                {"config": LOOPBACK_NETWORK, "ifName": "lo", "result": None},
                {"config": conf.to_dict(), "ifName": self.ifname, "result": None},
            ],
        }
        # Written before the first plugin runs: a crash mid-ADD still leaves DEL what it needs.
        await self._save(pod.id, entry)
        log.info("cni add pod=%s network=%s source=%s", pod.id, conf.name, conf.source)
        try:
            for net in entry["networks"]:
                net["result"] = await self._run_list("ADD", entry, net, netns)
                await self._save(pod.id, entry)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.delete(pod.id, netns)
            raise
        try:
            return CniResult.parse(entry["networks"][-1]["result"] or {})
        except (KeyError, TypeError, ValueError) as exc:
            await self.delete(pod.id, netns)
            raise Internal(f"CNI ADD pod={pod.id}: unreadable result: {exc}") from exc

    async def result(self, pod_id: str) -> CniResult | None:
        """The cached ADD result of the pod network, None if the pod has none."""
        entry = await asyncio.to_thread(_read_json, self._cache_path(pod_id))
        if not entry or not entry["networks"][-1].get("result"):
            return None
        return CniResult.parse(entry["networks"][-1]["result"])

    async def delete(self, pod_id: str, netns: str | None) -> None:
        """DEL with the cached config, arguments and result, networks in reverse order, then
        forget the pod. Idempotent: nothing cached means nothing to do. netns may be None or
        gone (plugins then only release host-side state: IPs, iptables rules).
        """
        path = self._cache_path(pod_id)
        entry = await asyncio.to_thread(_read_json, path)
        if entry is None:
            # A crash while add() wrote the first cache entry can leave its temp file.
            await asyncio.to_thread(files.remove, path)
            return
        if netns is not None and not await asyncio.to_thread(is_netns, Path(netns)):
            netns = None  # gone, or a bare file whose mount is gone: plugins would fail on it
        errors: list[Exception] = []
        for net in reversed(entry["networks"]):
            try:
                await self._run_list("DEL", entry, net, netns or "")
            except (CriError, OSError) as exc:
                errors.append(exc)
        if errors:  # keep the cache so a retry (kubelet retries StopPodSandbox) can finish
            raise errors[0]
        await asyncio.to_thread(files.remove, path)
        log.info("cni del pod=%s", pod_id)

    async def check(self, pod_id: str, netns: str) -> None:
        """CHECK the pod's networks against the cached results (skipped where the config
        disables it or its version predates CHECK).

        :raises FailedPrecondition: the pod was never added.
        :raises CniPluginError: a plugin found a problem.
        """
        entry = await asyncio.to_thread(_read_json, self._cache_path(pod_id))
        if entry is None:
            raise FailedPrecondition(f"CNI CHECK pod={pod_id}: pod has no network")
        for net in entry["networks"]:
            conf = net["config"]
            if conf.get("disableCheck") or conf["cniVersion"] in _NO_CHECK_VERSIONS:
                continue
            await self._run_list("CHECK", entry, net, netns)

    # -- plugin execution ------------------------------------------------------------------

    async def _settle_leftovers(self) -> None:
        """Before this daemon's first plugin: the previous daemon's, finished or killed."""
        if self._leftovers_settled is None:
            self._leftovers_settled = asyncio.ensure_future(
                plugin_leftovers.settle(self._cache_dir, self._timeout))
        await asyncio.shield(self._leftovers_settled)

    async def _save(self, pod_id: str, entry: dict[str, Any]) -> None:
        await asyncio.to_thread(files.write_atomic, self._cache_path(pod_id),
                                json.dumps(entry, indent=1), durable=True)

    async def _run_list(
        self, command: str, entry: dict[str, Any], net: dict[str, Any], netns: str
    ) -> dict[str, Any] | None:
        """Run one network's plugin chain; ADD chains each result into the next plugin's
        prevResult, DEL runs in reverse with the cached result, CHECK in order with it."""
        conf = net["config"]
        plugins = conf["plugins"]
        prev: dict[str, Any] | None = net.get("result") if command != "ADD" else None
        if command == "DEL":
            plugins = list(reversed(plugins))
        for plugin in plugins:
            stdin = copy.deepcopy(plugin)
            stdin["name"], stdin["cniVersion"] = conf["name"], conf["cniVersion"]
            if prev is not None:
                stdin["prevResult"] = prev
            # Only capabilities the plugin declares may appear in its runtimeConfig.
            caps = plugin.get("capabilities") or {}
            rc = {k: v for k, v in entry["runtimeConfig"].items() if caps.get(k) and v}
            if rc:
                stdin["runtimeConfig"] = rc
            out = await self._exec(plugin["type"], command, entry, net["ifName"], netns, stdin)
            if command == "ADD":
                prev = out if out is not None else prev
        return prev

    async def _exec(
        self,
        plugin_type: str,
        command: str,
        entry: dict[str, Any],
        ifname: str,
        netns: str,
        stdin: dict[str, Any],
    ) -> dict[str, Any] | None:
        pod_id = entry["containerId"]
        await self._settle_leftovers()
        binary = await asyncio.to_thread(self.find_plugin, plugin_type)
        if binary is None:
            raise FailedPrecondition(
                f"CNI {command} pod={pod_id}: plugin {plugin_type} not "
                f"found in {':'.join(self._bin_dirs)}"
            )
        env = dict(os.environ)  # plugins run iptables & co: they need PATH
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=pod_id,
            CNI_NETNS=netns,
            CNI_IFNAME=ifname,
            CNI_PATH=":".join(self._bin_dirs),
            CNI_ARGS=entry["cniArgs"],
            **plugin_leftovers.owner_env(self._cache_dir),
        )
        # The config goes in as a file, not a pipe we feed: a plugin that fails before reading
        # it would otherwise surface as a broken pipe (uvloop: "handler is closed") instead of
        # its own error.
        config_fd = _memfd(json.dumps(stdin).encode())
        try:
            proc = await spawn.spawn([binary], stdin=config_fd, stdout=spawn.PIPE,
                                     stderr=spawn.PIPE, env=env, cwd="/")
        finally:
            os.close(config_fd)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"CNI {command} pod={pod_id} plugin={plugin_type}: no answer in {self._timeout:g}s"
            ) from None
        finally:
            if proc.returncode is None:  # timeout or cancellation: never leave it running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        log.debug(
            "cni plugin pod=%s plugin=%s command=%s rc=%s stderr=%s",
            pod_id,
            plugin_type,
            command,
            proc.returncode,
            err.decode(errors="replace").strip(),
        )
        if proc.returncode != 0:
            raise self._plugin_error(plugin_type, command, pod_id, proc.returncode, out, err)
        if command != "ADD" or not out.strip():
            return None
        try:
            result = json.loads(out)
        except ValueError:
            raise CniPluginError(
                plugin_type, command, pod_id, None, f"output is not JSON: {out[:200]!r}"
            ) from None
        if not isinstance(result, dict):
            raise CniPluginError(plugin_type, command, pod_id, None, "output is not an object")
        return result

    @staticmethod
    def _plugin_error(
        plugin: str, command: str, pod_id: str, rc: int | None, out: bytes, err: bytes
    ) -> CniPluginError:
        try:
            data = json.loads(out)
            if isinstance(data, dict) and "code" in data:
                return CniPluginError(
                    plugin,
                    command,
                    pod_id,
                    int(data["code"]),
                    str(data.get("msg", "")),
                    str(data.get("details", "")),
                )
        except ValueError:
            pass
        stderr = err.decode(errors="replace").strip()[-500:]
        return CniPluginError(plugin, command, pod_id, None, f"exit status {rc}: {stderr}")


def _memfd(data: bytes) -> int:
    """An anonymous file holding `data`, positioned at its start."""
    fd = os.memfd_create("cni-config", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
