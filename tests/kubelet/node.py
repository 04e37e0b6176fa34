"""A standalone kubelet node on criserver: kubelet (built by `make kubelet`) without an API server,
running the static pods written into its manifest directory, on a criserver daemon with micro-VM
pods. Owns the kubelet process and what kubelet leaves on the host (mounts under its root dir,
/var/log/containers symlinks, iptables chains, sysctls): all undone when the node stops.

By hand (`make kubelet-node`): `python -m tests.kubelet.node` brings the same node up, with the
test registry mirror and images, prints where everything is and runs until Ctrl-C."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.cri_client import REPO
from tests.daemon import Daemon, unmount_under
from tests.e2e.conftest import vm_pids_of
from tests.registry import free_port

T = TypeVar("T")

NODE_NAME = "kubelet-node"
VM_LOCK = "/tmp/criserver-vm.lock"
BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
NGINX = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
LOG_DIR = REPO / "build" / "kubelet"  # kubelet's log and config, kept for a developer
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # hard-coded in kubelet
# Also hard-coded, whatever the root dir: the device plugin socket (and its checkpoint).
DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")
# The sysctls kubelet sets at start (protectKernelDefaults false): put back afterwards.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                   "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")
# The iptables chains kubelet creates (pkg/kubelet/kubelet_network_linux.go): table -> chains.
KUBELET_CHAINS = {"mangle": ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"),
                  "nat": ("KUBE-KUBELET-CANARY",),
                  "filter": ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY")}
IPTABLES = ("iptables", "ip6tables")


def kubelet_version() -> str:
    """The k8s.io/kubernetes version tools/kubelet/go.mod pins (one source of it)."""
    found = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", (REPO / "tools/kubelet/go.mod").read_text(),
                      re.M)
    assert found, "tools/kubelet/go.mod requires no k8s.io/kubernetes"
    return found[1]


def kubelet_binary() -> Path:
    """Where `make kubelet` puts it (it may not be built)."""
    return REPO / ".tools" / f"kubelet-{kubelet_version()}" / "kubelet"


def wait_for(check: Callable[[], T | None], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "", interval: float = 1.0) -> T:
    """Poll `check` until it returns something other than None/False; after `timeout` seconds
    fail naming `what` and the last state `detail` describes."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(interval)


def in_thread(coro_fn: Callable[[], Any]) -> Any:
    """Run an async function to completion on a loop of its own (callers may be in one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro_fn()).result()


def runtime_pods(daemon: Daemon) -> list[Any]:
    """criserver's pod sandboxes (ListPodSandbox, every state)."""

    async def list_pods() -> list[Any]:
        cri = daemon.client()
        try:
            return list((await cri.runtime.ListPodSandbox(timeout=30)).items)
        finally:
            await cri.close()

    return list(in_thread(list_pods))


def runtime_containers(daemon: Daemon) -> list[Any]:
    """criserver's containers (ListContainers, every state)."""

    async def list_containers() -> list[Any]:
        cri = daemon.client()
        try:
            return list((await cri.runtime.ListContainers(timeout=30)).containers)
        finally:
            await cri.close()

    return list(in_thread(list_containers))


def runtime_images(daemon: Daemon) -> list[Any]:
    """criserver's images (ListImages)."""

    async def list_images() -> list[Any]:
        cri = daemon.client()
        try:
            return list((await cri.image.ListImages(timeout=30)).images)
        finally:
            await cri.close()

    return list(in_thread(list_images))


# -- what kubelet changes on the host --------------------------------------------------------


def _chains(tool: str, table: str) -> set[str]:
    done = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True,
                          check=False)
    return {line[1:].split()[0] for line in done.stdout.splitlines() if line.startswith(":")}


@dataclass
class HostState:
    """What kubelet will change, as it was before: restored by `restore`."""

    sysctls: dict[str, str] = field(default_factory=dict)
    chains: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    had_log_links_dir: bool = True
    new_dirs: list[Path] = field(default_factory=list)  # the top one kubelet will create

    @classmethod
    def capture(cls) -> HostState:
        state = cls(had_log_links_dir=CONTAINER_LOG_LINKS.exists())
        missing = [d for d in (*reversed(DEVICE_PLUGINS.parents[:2]), DEVICE_PLUGINS)
                   if not d.exists()]
        state.new_dirs = missing[:1]
        for name in KUBELET_SYSCTLS:
            try:
                state.sysctls[name] = (Path("/proc/sys") / name).read_text().strip()
            except OSError:
                pass
        for tool in IPTABLES:
            if shutil.which(tool):
                for table in KUBELET_CHAINS:
                    state.chains[(tool, table)] = _chains(tool, table)
        return state

    def restore(self, pod_logs: Path) -> None:
        for name, value in self.sysctls.items():
            path = Path("/proc/sys") / name
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError as exc:
                print(f"warning: cannot restore sysctl {name}={value}: {exc}")
        self._remove_new_chains()
        self._remove_log_links(pod_logs)
        for path in self.new_dirs:
            shutil.rmtree(path, ignore_errors=True)

    def _remove_new_chains(self) -> None:
        """Delete the kubelet chains that were not there before, and the jumps to them."""
        for (tool, table), before in self.chains.items():
            now = _chains(tool, table)
            new = [c for c in KUBELET_CHAINS[table] if c not in before and c in now]
            if not new:
                continue
            rules = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True,
                                   check=False).stdout.splitlines()
            for rule in rules:  # e.g. "-A INPUT -j KUBE-FIREWALL"
                parts = rule.split()
                if (len(parts) > 2 and parts[0] == "-A" and parts[1] not in new
                        and parts[-2:-1] == ["-j"] and parts[-1] in new):
                    subprocess.run([tool, "-t", table, "-D", *parts[1:]], check=False,
                                   capture_output=True)
            for chain in new:
                subprocess.run([tool, "-t", table, "-F", chain], check=False, capture_output=True)
                subprocess.run([tool, "-t", table, "-X", chain], check=False, capture_output=True)

    def _remove_log_links(self, pod_logs: Path) -> None:
        if not CONTAINER_LOG_LINKS.is_dir():
            return
        for link in CONTAINER_LOG_LINKS.iterdir():
            if link.is_symlink() and os.readlink(link).startswith(f"{pod_logs}/"):
                link.unlink()
        if not self.had_log_links_dir and not any(CONTAINER_LOG_LINKS.iterdir()):
            CONTAINER_LOG_LINKS.rmdir()


# klog's header: severity, month, day, local time (no year).
KLOG_HEADER = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) ")


def klog_time(line: str) -> float | None:
    """When kubelet logged `line`, as a `time.time()` value; None for a line without klog's
    header (a continuation line)."""
    found = KLOG_HEADER.match(line)
    if found is None:
        return None
    month, day, hour, minute = (int(g) for g in found.groups()[:4])
    now = time.time()
    year = time.localtime(now).tm_year
    stamp = time.mktime((year, month, day, hour, minute, 0, 0, 0, -1)) + float(found[5])
    return stamp - 365 * 86400 if stamp > now + 86400 else stamp  # logged last year


# -- the node ----------------------------------------------------------------------------------


class KubeletNode:
    """kubelet on `daemon`'s socket with everything of its own under `workdir`."""

    def __init__(self, binary: Path, daemon: Daemon, workdir: Path,
                 name: str = NODE_NAME, extra_config: dict[str, Any] | None = None) -> None:
        self.binary = binary
        self.daemon = daemon
        self.workdir = workdir
        self.name = name
        self.extra_config = dict(extra_config or {})  # KubeletConfiguration fields a test sets
        self.root = workdir / "root"
        self.manifests = workdir / "manifests"
        self.pod_logs = workdir / "pod-logs"
        self.config_path = workdir / "kubelet.yaml"
        self.log_path = LOG_DIR / "kubelet.log"
        self.read_only_port = free_port()
        self.healthz_port = free_port()
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.host_state: HostState | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """A KubeletConfiguration for a node without an API server (docs: KUBELET.md)."""
        endpoint = f"unix://{self.daemon.socket}"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "5s",  # inotify sees changes at once; this is the fallback
            "containerRuntimeEndpoint": endpoint,
            "imageServiceEndpoint": endpoint,
            "failSwapOn": False,
            "authentication": {"webhook": {"enabled": False}, "anonymous": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failCgroupV1": False,
            "oomScoreAdj": 0,
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": self.read_only_port,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "podLogsDir": str(self.pod_logs),
            "volumePluginDir": str(self.workdir / "volume-plugins"),
            # Never garbage-collect the images the tests pushed, never evict for this host's
            # disk or memory: the node is a test bench, not a production node.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            # Micro-VMs under TCG: leave calls time to finish.
            "runtimeRequestTimeout": "4m",
            **self.extra_config,
        }

    def start(self, timeout: float = 90) -> KubeletNode:
        for path in (self.root, self.manifests, self.pod_logs):
            path.mkdir(parents=True, exist_ok=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        shutil.copy(self.config_path, LOG_DIR / "kubelet.yaml")
        restarted = self.host_state is not None  # the host as it was before the first start
        if not restarted:
            self.host_state = HostState.capture()
        argv = [str(self.binary), f"--config={self.config_path}", f"--root-dir={self.root}",
                f"--cert-dir={self.workdir / 'pki'}", f"--hostname-override={self.name}",
                "--v=2"]
        with open(self.log_path, "ab" if restarted else "wb") as log:
            log.write(f"# {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(self._healthy, timeout, "kubelet's /healthz to answer ok",
                     lambda: self.log_tail(), interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"kubelet exited with {self.process.returncode}\n"
                                 f"{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/healthz",
                                        timeout=5) as answer:
                return bool(answer.read().strip() == b"ok")
        except OSError:
            return False

    def stop(self, teardown_timeout: float = 240) -> None:
        """Remove every manifest and let kubelet tear its pods down (bounded), stop kubelet,
        then undo what it left on the host. Pods kubelet did not remove are the daemon
        fixture's to remove."""
        try:
            if self.process is not None and self.process.poll() is None:
                for manifest in self.manifests.glob("*"):
                    manifest.unlink()
                try:  # /pods forgets a pod at once; its sandbox stops later
                    wait_for(lambda: not self.ready_sandboxes(), teardown_timeout,
                             "kubelet to stop every static pod's sandbox", self.describe)
                except AssertionError as exc:
                    print(f"warning: {exc}")
        finally:
            self._stop_process()
            unmount_under(self.workdir)
            if self.host_state is not None:
                self.host_state.restore(self.pod_logs)
                self.host_state = None

    def restart(self, extra_config: dict[str, Any], timeout: float = 90) -> None:
        """Stop kubelet alone and start it again with `extra_config` in place of the node's
        own: same root dir, manifests and pods (kubelet adopts them), its log appended to."""
        self._stop_process()
        self.extra_config = dict(extra_config)
        self.start(timeout)

    def _stop_process(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def ready_sandboxes(self) -> list[Any]:
        """criserver's pod sandboxes in state SANDBOX_READY (0)."""
        return [p for p in runtime_pods(self.daemon) if p.state == 0]

    # -- static pods ----------------------------------------------------------------------

    def full_name(self, name: str) -> str:
        """A static pod's name as kubelet reports it: `<name>-<node name>`."""
        return f"{name}-{self.name}"

    def container_log(self, pod: str, container: str, containing: str,
                      timeout: float = 30) -> str:
        """The first run's log of a static pod's container, in kubelet's pod logs dir, once it
        holds `containing`: a running container's lines reach the file a moment after it
        prints them."""
        pattern = f"default_{self.full_name(pod)}_*/{container}/0.log"

        def text() -> str:
            return "".join(p.read_text() for p in self.pod_logs.glob(pattern))

        return wait_for(lambda: text() if containing in text() else None, timeout,
                        f"{containing!r} in the container's log {pattern}",
                        lambda: f"the log so far: {text()!r}")

    def write_manifest(self, pod: dict[str, Any]) -> Path:
        """Add a static pod (a v1 Pod as a dict). Written aside then renamed: kubelet never
        reads half a file (it skips names starting with a dot)."""
        name = pod["metadata"]["name"]
        path = self.manifests / f"{name}.yaml"
        partial = self.manifests / f".{name}.yaml.partial"
        partial.write_text(json.dumps(pod, indent=2) + "\n")
        partial.rename(path)
        return path

    def remove_manifest(self, name: str) -> None:
        (self.manifests / f"{name}.yaml").unlink()

    def pods(self) -> list[dict[str, Any]]:
        """The pods kubelet runs, with their status (the read-only port's /pods)."""
        url = f"http://127.0.0.1:{self.read_only_port}/pods"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return list(json.load(answer).get("items") or [])

    def pod(self, name: str) -> dict[str, Any] | None:
        """The static pod from manifest `name`, or None."""
        return next((p for p in self.pods() if p["metadata"]["name"] == self.full_name(name)),
                    None)

    def wait_pod(self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str) -> dict[str, Any]:
        """Wait until the static pod `name` exists and `check(pod)` holds; return the pod."""

        def ready() -> dict[str, Any] | None:
            pod = self.pod(name)
            return pod if pod is not None and check(pod) else None

        return wait_for(ready, timeout, f"pod {name}: {what}", lambda: self.describe(name))

    def describe(self, name: str | None = None) -> str:
        """The pod's status as kubelet reports it, criserver's pods, kubelet's errors."""
        try:
            pods = [p for p in self.pods()
                    if name is None or p["metadata"]["name"] == self.full_name(name)]
            status = json.dumps([p.get("status") for p in pods], indent=1)[-4000:]
        except (OSError, ValueError) as exc:
            status = f"(kubelet's /pods: {exc!r})"
        try:
            sandboxes = [(p.metadata.name, p.id[:12], p.state) for p in runtime_pods(self.daemon)]
        except Exception as exc:
            sandboxes = [("(ListPodSandbox failed)", repr(exc), 0)]
        errors = "\n".join(self.error_lines()[-30:])
        return (f"kubelet status: {status}\ncriserver pods (name, id, state): {sandboxes}\n"
                f"kubelet's error lines:\n{errors}\nkubelet log: {self.log_path}")

    # -- kubelet's log ---------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_lines(self) -> int:
        """How many lines kubelet's log has: a mark for `error_lines(since=...)`."""
        return len(self.log().splitlines())

    def error_lines(self, since: int = 0) -> list[str]:
        """klog's error lines (`E1202 15:04:05.000000 ...`) after line `since`."""
        return [line for line in self.log().splitlines()[since:] if re.match(r"E\d{4} ", line)]

    def runtime_errors(self, since: int = 0) -> list[str]:
        """kubelet's errors about CRI calls criserver failed, after line `since`. NotFound
        (kubelet asks for the status of containers it has just removed) and Canceled (kubelet
        gave up a call itself) are kubelet's normal course with any runtime."""
        return [line for line in self.error_lines(since)
                if "rpc error" in line and not re.search(r"code = (NotFound|Canceled)\b", line)]


# -- what the scenarios share -----------------------------------------------------------

# Under TCG: a pod boots in seconds, a container is created in ~2 s, an image is pulled once
# per daemon; kubelet retries a failed step after backoff. Generous, but bounded.
START_TIMEOUT = 300
# kubelet stops a removed pod at once, but removes its sandbox in container GC (every minute).
GONE_TIMEOUT = 240


def pod_manifest(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        # busybox's sleep ignores SIGTERM as pid 1: do not wait kubelet's default 30 s for it
        "spec": {"terminationGracePeriodSeconds": 2, "containers": containers, **spec},
    }


def statuses(pod: dict[str, Any], key: str = "containerStatuses") -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in pod.get("status", {}).get(key) or []}


def all_running(count: int) -> Any:
    def check(pod: dict[str, Any]) -> bool:
        found = statuses(pod)
        return (pod.get("status", {}).get("phase") == "Running" and len(found) == count
                and all("running" in s.get("state", {}) and s.get("ready") for s in found.values()))

    return check


def sandbox_of(node: KubeletNode, name: str) -> Any:
    """criserver's sandbox for the static pod `name` (kubelet names it after the pod)."""
    found = [p for p in runtime_pods(node.daemon) if p.metadata.name == node.full_name(name)]
    assert len(found) == 1, f"expected one sandbox for {name}, criserver has {found}"
    return found[0]


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


def assert_no_runtime_errors(node: KubeletNode, since: int) -> None:
    errors = node.runtime_errors(since)
    assert not errors, "criserver failed kubelet's CRI calls:\n" + "\n".join(errors[:10])


def remove_and_check_gone(node: KubeletNode, name: str, sandbox_id: str) -> None:
    """Remove the manifest; kubelet must stop the pod, its VM must end, and kubelet's GC must
    remove the sandbox and its containers from criserver."""
    node.remove_manifest(name)
    wait_for(lambda: node.pod(name) is None, 60, f"kubelet to drop pod {name}",
             lambda: node.describe(name))
    wait_for(lambda: not vm_pids_of(sandbox_id), GONE_TIMEOUT,
             f"the VM of pod {name} to end", lambda: node.describe(name))
    wait_for(lambda: not [p for p in runtime_pods(node.daemon) if p.id == sandbox_id],
             GONE_TIMEOUT, f"kubelet's GC to remove the sandbox of pod {name}",
             lambda: node.describe(name))
    left = [c for c in runtime_containers(node.daemon) if c.pod_sandbox_id == sandbox_id]
    assert not left, f"containers left of pod {name}: {left}"


@contextmanager
def running_node(daemon: Daemon, binary: Path | None = None,
                 extra_config: dict[str, Any] | None = None) -> Iterator[KubeletNode]:
    """A kubelet node on `daemon` in a scratch dir, stopped and cleaned up afterwards;
    `extra_config`: KubeletConfiguration fields added to (or replacing) the node's own."""
    workdir = Path(tempfile.mkdtemp(prefix="kln-", dir="/tmp"))
    node = KubeletNode(binary or kubelet_binary(), daemon, workdir, extra_config=extra_config)
    try:
        yield node.start()
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    """Bring a node up by hand: registry with the conformance images, daemon, kubelet; the VM
    lock held throughout (as every run that boots VMs on the shared machine)."""
    from tests.conformance.conftest import mirror_config
    from tests.conformance.images import push_all
    from tests.e2e.conftest import running_vm_daemon
    from tests.registry import _start_registry, _stop

    binary = kubelet_binary()
    if not binary.exists():
        print(f"{binary.relative_to(REPO)} is missing: run `make kubelet`", file=sys.stderr)
        return 1
    # Ctrl-C must reach this process only: blocked here, the daemon and QEMU inherit the
    # block and keep running while the node is torn down (kubelet has a session of its own).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    with open(VM_LOCK, "a") as lock:
        print(f"waiting for {VM_LOCK}...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        scratch = Path(tempfile.mkdtemp(prefix="kln-registry-", dir="/tmp"))
        registry = _start_registry(scratch / "registry", htpasswd=False)
        try:
            asyncio.run(push_all(registry.base))
            with running_vm_daemon(mirror_config(registry)) as daemon, \
                    running_node(daemon, binary) as node:
                print(f"criserver: unix://{daemon.socket} (log {daemon.log_path})\n"
                      f"kubelet:   log {node.log_path}, root dir {node.root}\n"
                      f"static pod manifests: {node.manifests}\n"
                      f"pods:      curl http://127.0.0.1:{node.read_only_port}/pods\n"
                      f"images:    {BUSYBOX}, {NGINX} (mirror {registry.host})\n"
                      "Ctrl-C stops and cleans up everything.", flush=True)
                while node.process is not None and node.process.poll() is None:
                    if signal.sigtimedwait({signal.SIGINT, signal.SIGTERM}, 1) is not None:
                        print("stopping...", flush=True)
                        break
                else:
                    print(f"kubelet exited:\n{node.log_tail()}", flush=True)
        finally:
            _stop(registry)
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
