"""A private containerd (CRI plugin, runc) for same-run baselines: its own root, state, socket,
runc root, CNI network (bridge + host-local from /usr/lib/cni, private bridge name, subnet and
IPAM dir) and a local registry reached over plain HTTP. Never touches the host's containerd.

    with Containerd(registry_host="127.0.0.1:5000", pause_ref="127.0.0.1:5000/x/pause:1") as c:
        cri = c.client()   # tests.cri_client.CRIClient on c.socket

`mirrors` names upstream registries ("registry.k8s.io", "docker.io", ...) whose pulls go to the
local registry too, under the same repository paths (one certs.d/<name>/hosts.toml each).

Needs the Debian package `containerd` (1.6.20 in bookworm: containerd, containerd-shim-runc-v2)
and `runc`, `containernetworking-plugins`. `close` stops containerd and its shims, unmounts
what it left under its work dir, deletes the bridge and any pod netns it still knows of.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from criserver.network.cni import DefaultNetwork, default_conflist
from tests.cri_client import CRIClient
from tests.daemon import unmount_under

CONTAINERD_BIN = "/usr/bin/containerd"
RUNC_BIN = "/usr/sbin/runc"
CNI_BIN_DIR = "/usr/lib/cni"
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
SHIM_SOCKET_ROOT = Path("/run/containerd")  # containerd 1.6 puts shim sockets in <this>/s/


def _free_subnet() -> str:
    """A /24 in 10.160-199.x.0 (criserver's benches and tests use 10.200-250) not routed here."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = f"10.{random.randint(160, 199)}.{random.randint(0, 255)}"
        if f"{net}." not in routes:
            return f"{net}.0/24"
    raise RuntimeError("no free 10.x subnet")


def config_toml(work: Path, registry_host: str, pause_ref: str, snapshotter: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{work}/root"
state = "{work}/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"

[{cri}]
  sandbox_image = "{pause_ref}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # This host's root lacks CAP_SYS_RESOURCE: the sandbox's default -998 cannot be set.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC_BIN}"
        Root = "{work}/runc"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{work}/net.d"
    max_conf_num = 1
  [{cri}.registry]
    config_path = "{work}/certs.d"
"""


def hosts_toml(registry_host: str) -> str:
    return (f'server = "http://{registry_host}"\n\n'
            f'[host."http://{registry_host}"]\n  capabilities = ["pull", "resolve"]\n'
            "  skip_verify = true\n")


def cni_conflist(name: str, bridge: str, subnet: str, ipam_dir: Path,
                 chain: str = "plain") -> str:
    """"plain": a bridge as gateway with host-local, no masquerade; "builtin": criserver's
    built-in network itself (default_conflist: masquerade, hairpin, then portmap), for runs
    where both runtimes must run the same plugins."""
    if chain == "builtin":
        return json.dumps(default_conflist([subnet], DefaultNetwork(name, bridge, str(ipam_dir))),
                          indent=1)
    if chain != "plain":
        raise ValueError(f"unknown CNI chain {chain!r}")
    return json.dumps({
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(ipam_dir)},
        }],
    }, indent=1)


class Containerd:
    """One private containerd process; `close` (or leaving the `with`) undoes everything."""

    def __init__(self, registry_host: str, pause_ref: str, snapshotter: str = "overlayfs",
                 mirrors: Iterable[str] = (), cni_chain: str = "plain") -> None:
        self.work = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.tag = secrets.token_hex(3)
        self.socket = self.work / "containerd.sock"
        self.log_path = self.work / "containerd.log"
        self.bridge = f"ctrb{self.tag}"
        self.network = f"ctrb-{self.tag}"
        self.subnet = _free_subnet()
        self.process: subprocess.Popen[bytes] | None = None
        self.netns_paths: set[str] = set()  # pod netns seen, removed in close if still there
        self._had_shim_root = SHIM_SOCKET_ROOT.exists()
        (self.work / "net.d").mkdir()
        (self.work / "net.d" / "10-bench.conflist").write_text(
            cni_conflist(self.network, self.bridge, self.subnet, self.work / "ipam", cni_chain))
        # certs.d/<host:port>/hosts.toml (containerd 1.6 remotes/docker/config hostPaths)
        for name in (registry_host, *mirrors):
            hosts = self.work / "certs.d" / name
            hosts.mkdir(parents=True)
            (hosts / "hosts.toml").write_text(hosts_toml(registry_host))
        self.config_path = self.work / "config.toml"
        self.config_path.write_text(config_toml(self.work, registry_host, pause_ref, snapshotter))

    @property
    def runc_root(self) -> Path:
        return self.work / "runc" / NAMESPACE

    def start(self, timeout: float = 30) -> Containerd:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [CONTAINERD_BIN, "--config", str(self.config_path)],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"containerd did not listen in {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def client(self) -> CRIClient:
        return CRIClient(self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes of this containerd (they carry its socket path)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and \
                    str(self.socket).encode() in cmd:
                pids.append(int(proc.name))
        return pids

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Shims outlive containerd by design; whatever pods were not removed through the CRI
        # die with their shim (runc's init is the shim's child, in its own cgroup).
        for pid in self.shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.runc_root.exists():
            for cid in os.listdir(self.runc_root):
                subprocess.run([RUNC_BIN, "--root", str(self.runc_root), "delete", "--force", cid],
                               capture_output=True, check=False)
        unmount_under(self.work)
        for ns in self.netns_paths:
            if os.path.exists(ns):
                subprocess.run(["umount", "-l", ns], capture_output=True, check=False)
                try:
                    os.unlink(ns)
                except OSError:
                    pass
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        shutil.rmtree(self.work, ignore_errors=True)
        if not self._had_shim_root:  # only what this run created, and only if empty
            for d in (SHIM_SOCKET_ROOT / "s", SHIM_SOCKET_ROOT):
                try:
                    d.rmdir()
                except OSError:
                    pass
