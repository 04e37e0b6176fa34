"""A crictl user's session against the real daemon with micro-VM pods: every path the README's
"Using it" names, driven only through the real crictl binary (cri-tools, `make tools`), with
the outcomes checked in its text and `-o json` output, its exit codes, and inside the guests.

Pods are VMs, so the module keeps to two: a busybox pod whose long-running container most tests
share, and an nginx pod for port-forward; short-lived containers cover the stop and remove paths.
The tests run in order, as a user would type the commands."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import pty
import queue
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conformance.tools import cri_tool
from tests.daemon import Daemon
from tests.e2e.conftest import vm_pids_of
from tests.registry import free_port

pytestmark = pytest.mark.vm

BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
NGINX = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
TEST_IMAGE = "gcr.io/k8s-staging-cri-tools/test-image-1:latest"
NAMESPACE = "crictl-session"
HEX_ID = re.compile(r"^[0-9a-f]{64}$")
# A pod and a container start in seconds under TCG; a call that takes this long hangs.
CALL_TIMEOUT = 120


# -- crictl --------------------------------------------------------------------------------------


class Crictl:
    """The crictl binary with a config file of its own (never /etc/crictl.yaml)."""

    def __init__(self, binary: Path, config: Path) -> None:
        self.binary = binary
        self.config = config

    def argv(self, *args: str) -> list[str]:
        return [str(self.binary), "--config", str(self.config), *args]

    def run(self, *args: str, stdin: str | None = None, timeout: float = CALL_TIMEOUT,
            expect_rc: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run `crictl ARGS`; unless expect_rc is None, its exit code must be expect_rc."""
        done = subprocess.run(self.argv(*args), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
        if expect_rc is not None:
            assert done.returncode == expect_rc, (
                f"crictl {' '.join(args)} exited {done.returncode}, not {expect_rc}\n"
                f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}")
        return done

    def out(self, *args: str, **kwargs: Any) -> str:
        return self.run(*args, **kwargs).stdout

    def json(self, command: str, *args: str) -> Any:
        """`crictl COMMAND -o json ARGS` parsed (flags go before the positional arguments)."""
        return json.loads(self.out(command, "-o", "json", *args))

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), text=True, **kwargs)


class Lines:
    """A process's output stream read line by line in a thread, so waits have deadlines."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (from now on) matching `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; "
                                     f"saw {self.seen}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended before a line matching {pattern!r}; "
                                     f"saw {self.seen}")
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def rest(self, timeout: float) -> list[str]:
        """Every remaining line, once the stream ends."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"output did not end within {timeout}s"
        while (line := self._queue.get_nowait()) is not None:
            self.seen.append(line)
        return self.seen


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> int:
    """End a streaming crictl (port-forward, logs -f) as a user's Ctrl-C would."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


class Terminal:
    """A program on a real pseudo-terminal of the given size, as a user's shell runs crictl."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = b""
        self._mark = 0

    def expect(self, text: str, timeout: float) -> str:
        """Read until `text` shows up after the previous expectation; the output up to it."""
        deadline = time.monotonic() + timeout
        wanted = text.encode()
        while (at := self.output.find(wanted, self._mark)) < 0:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"{text!r} not on the terminal within {timeout}s; "
                                     f"it shows {self.output.decode(errors='replace')!r}")
        start, self._mark = self._mark, at + len(wanted)
        return self.output[start:self._mark].decode(errors="replace")

    def _read(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the terminal's other side is gone
            return False
        self.output += chunk
        return bool(chunk)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(min(0.2, deadline - time.monotonic()))
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"crictl did not end within {timeout}s; the terminal shows "
                                 f"{self.output.decode(errors='replace')!r}")
        while self._read(0.2):
            pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


# -- pods and containers as crictl's JSON files -------------------------------------------------


@dataclass
class Pod:
    id: str
    name: str
    config: Path  # the pod's JSON, which `crictl create` takes again
    workdir: Path
    containers: dict[str, str] = field(default_factory=dict)  # name -> ID

    def create(self, crictl: Crictl, name: str, image: str, command: list[str] | None = None,
               **fields: Any) -> str:
        """`crictl create POD CONTAINER.json POD.json`: the new container's ID."""
        config: dict[str, Any] = {
            "metadata": {"name": name},
            "image": {"image": image},
            "log_path": f"{name}.log",
            "labels": {"container": name},
            "linux": {},
            **fields,
        }
        if command is not None:
            config["command"] = command
        path = self.workdir / f"container-{name}.json"
        path.write_text(json.dumps(config))
        cid = crictl.out("create", self.id, str(path), str(self.config)).strip()
        assert HEX_ID.match(cid), cid
        self.containers[name] = cid
        return cid

    def run(self, crictl: Crictl, name: str, image: str, command: list[str] | None = None,
            **fields: Any) -> str:
        cid = self.create(crictl, name, image, command, **fields)
        assert crictl.out("start", cid).strip() == cid
        return cid


def run_pod(crictl: Crictl, workdir: Path, name: str) -> Pod:
    """`crictl runp POD.json`, with the pod's logs under `workdir`."""
    logs = workdir / f"logs-{name}"
    logs.mkdir()
    config = {
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "attempt": 1},
        "hostname": name,
        "log_directory": str(logs),
        "labels": {"session": "crictl", "pod": name},
        "annotations": {"crictl.test/purpose": name},
        "linux": {},
    }
    path = workdir / f"pod-{name}.json"
    path.write_text(json.dumps(config))
    pod_id = crictl.out("runp", str(path)).strip()
    assert HEX_ID.match(pod_id), pod_id
    return Pod(pod_id, name, path, workdir)


def remove_pod(crictl: Crictl, pod_id: str) -> None:
    """Teardown: force-remove the pod if a test did not get to it."""
    if pod_id in crictl.out("pods", "-q", "--no-trunc").split():
        crictl.run("rmp", "-f", pod_id)


def container(crictl: Crictl, cid: str) -> dict[str, Any]:
    """The container as `crictl ps -a -o json` lists it."""
    listed = crictl.json("ps", "-a", "--id", cid)["containers"]
    assert len(listed) == 1, listed
    return dict(listed[0])


def wait_state(crictl: Crictl, cid: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (found := container(crictl, cid))["state"] != state:
        assert time.monotonic() < deadline, f"container {cid} is {found['state']}, not {state}"
        time.sleep(0.5)
    return found


def until(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe()
        except (OSError, AssertionError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {timeout}s: {exc!r}") from exc
            time.sleep(0.5)


def uint(value: Any) -> int:
    """A protobuf JSON 64-bit integer (a string) or a wrapper message's value."""
    if isinstance(value, dict):
        value = value.get("value", 0)
    return int(value)


# -- module fixtures: the session's crictl, pods and long-running container ----------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crictl")


@pytest.fixture(scope="module")
def crictl(conformance_daemon: Daemon, workdir: Path) -> Crictl:
    endpoint = f"unix://{conformance_daemon.socket}"
    config = workdir / "crictl.yaml"
    # timeout: crictl's deadline for each call; a VM pod takes seconds to start under TCG.
    config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n"
                      f"timeout: {CALL_TIMEOUT}\ndebug: false\npull-image-on-create: false\n")
    return Crictl(cri_tool("crictl"), config)


@pytest.fixture(scope="module")
def busybox_pod(crictl: Crictl, workdir: Path) -> Iterator[Pod]:
    crictl.run("pull", BUSYBOX)
    pod = run_pod(crictl, workdir, "session")
    try:
        yield pod
    finally:
        remove_pod(crictl, pod.id)


@pytest.fixture(scope="module")
def worker(crictl: Crictl, busybox_pod: Pod) -> str:
    """The long-running container most tests use; it ends promptly (0) on SIGTERM."""
    return busybox_pod.run(crictl, "worker", BUSYBOX, [
        "sh", "-c", "trap 'exit 0' TERM; echo worker up; while true; do sleep 1; done"])


@pytest.fixture(scope="module")
def nginx_pod(crictl: Crictl, workdir: Path) -> Iterator[Pod]:
    crictl.run("pull", NGINX)
    pod = run_pod(crictl, workdir, "web")
    try:
        nginx = pod.run(crictl, "nginx", NGINX)
        # Serving once it answers inside the pod (the image has busybox's wget): a forwarded
        # connection nothing listens for ends crictl's port-forward, as it ends kubectl's.
        until(lambda: crictl.run("exec", "-s", nginx, "wget", "-q", "-O", "/dev/null",
                                 "http://127.0.0.1/"), 60, "nginx did not serve")
        yield pod
    finally:
        remove_pod(crictl, pod.id)


# -- the session -----------------------------------------------------------------------------------


def test_version(crictl: Crictl) -> None:
    done = crictl.run("version")
    fields = dict(re.findall(r"^(\w+):\s+(\S+)$", done.stdout, re.M))
    assert fields["RuntimeName"] == "criserver"
    assert fields["RuntimeApiVersion"] == "v1"
    assert fields["RuntimeVersion"]
    assert done.stderr == "", "crictl complains about its configuration"


def test_info(crictl: Crictl) -> None:
    info = crictl.json("info")
    conditions = {c["type"]: c for c in info["status"]["conditions"]}
    assert conditions["RuntimeReady"]["status"] is True
    assert conditions["NetworkReady"]["status"] is True, conditions["NetworkReady"]
    handlers = {h.get("name", ""): h for h in info["runtimeHandlers"]}  # "": the default
    assert "" in handlers and "microvm" in handlers and "runc" in handlers, handlers
    quiet = crictl.json("info", "-q")
    assert quiet["status"]["conditions"] == info["status"]["conditions"]
    assert set(info) - set(quiet), "no verbose information beside the status"


def test_pull_images_inspecti_imagefsinfo(crictl: Crictl, conformance_daemon: Daemon) -> None:
    image_ids = {}
    for ref in (BUSYBOX, NGINX, TEST_IMAGE):
        pulled = re.fullmatch(r"Image is up to date for (sha256:[0-9a-f]{64})\n",
                              crictl.out("pull", ref))
        assert pulled, ref
        image_ids[ref] = pulled[1]

    table = crictl.out("images")
    assert table.splitlines()[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    rows = {tuple(line.split()[:2]) for line in table.splitlines()[1:]}
    for ref in image_ids:
        assert tuple(ref.rsplit(":", 1)) in rows, table

    listed = {image["id"]: image for image in crictl.json("images")["images"]}
    for ref, image_id in image_ids.items():
        assert ref in listed[image_id]["repoTags"]
        assert uint(listed[image_id]["size"]) > 0
    assert crictl.out("images", "-q", "--no-trunc", TEST_IMAGE).split() == [image_ids[TEST_IMAGE]]

    inspected = crictl.json("inspecti", BUSYBOX)
    assert inspected["status"]["id"] == image_ids[BUSYBOX]
    assert BUSYBOX in inspected["status"]["repoTags"]
    assert any(d.startswith("registry.k8s.io/e2e-test-images/busybox@sha256:")
               for d in inspected["status"]["repoDigests"]), inspected["status"]

    fs = crictl.json("imagefsinfo")["status"]
    image_fs = fs["imageFilesystems"]
    assert image_fs and image_fs[0]["fsId"]["mountpoint"].startswith(str(conformance_daemon.root))
    assert uint(image_fs[0]["usedBytes"]) > 0
    assert uint(image_fs[0]["inodesUsed"]) > 0


def test_runp_pods_inspectp(crictl: Crictl, busybox_pod: Pod, conformance_daemon: Daemon) -> None:
    table = crictl.out("pods", "--no-trunc")
    assert table.splitlines()[0].split()[:4] == ["POD", "ID", "CREATED", "STATE"]
    row = next(line.split() for line in table.splitlines() if line.startswith(busybox_pod.id))
    assert "Ready" in row and "session" in row and NAMESPACE in row

    assert crictl.out("pods", "-q", "--no-trunc", "--name", "^session$").split() == [
        busybox_pod.id]
    assert crictl.out("pods", "-q", "--no-trunc", "--label", "pod=session").split() == [
        busybox_pod.id]
    assert crictl.out("pods", "-q", "--label", "pod=nosuch") == ""
    listed = crictl.json("pods", "--id", busybox_pod.id)["items"]
    assert [p["state"] for p in listed] == ["SANDBOX_READY"]
    assert listed[0]["metadata"] == {"name": "session", "uid": "uid-session",
                                     "namespace": NAMESPACE, "attempt": 1}
    assert listed[0]["labels"] == {"session": "crictl", "pod": "session"}

    status = crictl.json("inspectp", busybox_pod.id)["status"]
    assert status["id"] == busybox_pod.id
    assert status["state"] == "SANDBOX_READY"
    subnet = re.search(r'default_subnet = "([\d./]+)"', conformance_daemon.config_path.read_text())
    assert subnet, "the daemon's config names no subnet"
    assert ipaddress.ip_address(status["network"]["ip"]) in ipaddress.ip_network(subnet[1])
    assert status["annotations"] == {"crictl.test/purpose": "session"}
    assert vm_pids_of(busybox_pod.id), "no QEMU runs the pod"


def test_create_start_ps_inspect(crictl: Crictl, busybox_pod: Pod) -> None:
    cid = busybox_pod.create(crictl, "hello", BUSYBOX, [
        "sh", "-c", "echo hello from $(hostname); sleep 5; exit 3"])
    created = container(crictl, cid)
    assert created["state"] == "CONTAINER_CREATED"
    assert created["podSandboxId"] == busybox_pod.id
    assert created["metadata"]["name"] == "hello"
    assert cid not in crictl.out("ps", "-q", "--no-trunc").split()  # not running: ps -a only
    assert cid in crictl.out("ps", "-a", "-q", "--no-trunc").split()

    assert crictl.out("start", cid).strip() == cid
    table = crictl.out("ps", "--no-trunc", "--name", "^hello$")
    row = next(line.split() for line in table.splitlines()[1:] if line.startswith(cid))
    assert "Running" in row and "hello" in row and busybox_pod.id in row
    status = crictl.json("inspect", cid)["status"]
    assert status["state"] == "CONTAINER_RUNNING"
    assert status["image"]["image"] == BUSYBOX
    assert status["labels"] == {"container": "hello"}

    exited = wait_state(crictl, cid, "CONTAINER_EXITED")
    assert exited["id"] == cid
    status = crictl.json("inspect", cid)["status"]
    assert status["exitCode"] == 3
    # RFC 3339 times in UTC with nanoseconds: in order as strings
    assert status["finishedAt"] > status["startedAt"] > "2000", status
    assert crictl.out("logs", cid) == "hello from session\n"
    assert crictl.out("rm", cid).strip() == cid
    assert cid not in crictl.out("ps", "-a", "-q", "--no-trunc")


def test_exec_sync(crictl: Crictl, worker: str) -> None:
    # crictl prints the command's stdout, then its stderr, each followed by a newline.
    assert crictl.out("exec", "-s", worker, "sh", "-c", "echo out; echo err >&2") == (
        "out\n\nerr\n\n")
    # A command that fails: crictl exits 1 with its exit code and stderr in the message.
    failed = crictl.run("exec", "-s", worker, "sh", "-c", "echo err >&2; exit 3", expect_rc=1)
    assert "exited with 3: err" in failed.stderr, failed.stderr
    assert crictl.out("exec", "-s", worker, "hostname").split() == ["session"]
    slow = crictl.run("exec", "-s", "--timeout", "1", worker, "sleep", "30", expect_rc=1,
                      timeout=20)
    assert re.search(r"timed? ?out|deadline", slow.stderr, re.I), slow.stderr


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_exec_stdin(crictl: Crictl, worker: str, transport: str) -> None:
    lines = "".join(f"line {i}\n" for i in range(200))
    # tr ends only when crictl's end of stdin reaches it
    done = crictl.run("exec", "-i", "-r", transport, worker, "tr", "a-z", "A-Z", stdin=lines)
    assert done.stdout == lines.upper()
    done = crictl.run("exec", "-r", transport, worker, "sh", "-c", "echo to-err >&2; exit 7",
                      expect_rc=1)
    assert done.stderr.startswith("to-err\n"), done.stderr
    assert "command terminated with exit code 7" in done.stderr, done.stderr


def test_exec_tty(crictl: Crictl, worker: str) -> None:
    term = Terminal(crictl.argv("exec", "-it", worker, "sh"), rows=31, cols=97)
    try:
        term.expect("# ", timeout=60)  # busybox sh's prompt as root
        term.type("tty; stty size; echo $((6*7))\r")
        shown = term.expect("42", timeout=30)
        assert re.search(r"/dev/pts/\d+", shown), shown
        assert "31 97" in shown, f"the terminal's size did not reach the container: {shown!r}"
        term.type("exit 5\r")
        assert term.wait(30) == 1  # crictl's code for any failure
        assert "command terminated with exit code 5" in term.expect("exit code 5", timeout=1)
    finally:
        term.close()


def test_attach(crictl: Crictl, busybox_pod: Pod) -> None:
    cid = busybox_pod.run(crictl, "attached", BUSYBOX,
                          ["sh", "-c", "while read line; do echo got:$line; done; echo bye"],
                          stdin=True, stdin_once=True)
    wait_state(crictl, cid, "CONTAINER_RUNNING")
    done = crictl.run("attach", "-i", cid, stdin="ping\npong\n")
    assert done.stdout == "got:ping\ngot:pong\nbye\n"
    # stdin_once: the end of the attached stdin is the end of the container's
    assert wait_state(crictl, cid, "CONTAINER_EXITED")
    assert crictl.json("inspect", cid)["status"]["exitCode"] == 0
    crictl.run("rm", cid)


def test_logs_follow(crictl: Crictl, busybox_pod: Pod) -> None:
    cid = busybox_pod.run(crictl, "logger", BUSYBOX, [
        "sh", "-c", "echo start; echo to-stderr >&2; i=0; "
                    "while [ ! -e /tmp/stop ]; do i=$((i+1)); echo tick $i; sleep 0.3; done; "
                    "echo done"])
    follow = crictl.popen("logs", "-f", cid, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    try:
        out, err = Lines(follow.stdout), Lines(follow.stderr)  # type: ignore[arg-type]
        out.wait_for(r"^start$", timeout=60)
        out.wait_for(r"^tick 3$", timeout=60)  # written after `logs -f` began
        err.wait_for(r"^to-stderr$", timeout=30)
        assert container(crictl, cid)["state"] == "CONTAINER_RUNNING"
        crictl.run("exec", "-s", cid, "touch", "/tmp/stop")
        out.wait_for(r"^done$", timeout=30)
        # The container has ended: `logs -f` ends by itself (it checks every few seconds).
        assert follow.wait(30) == 0
        ticks = [line for line in out.rest(5) if line.startswith("tick")]
        assert ticks == [f"tick {i}" for i in range(1, len(ticks) + 1)]
    finally:
        stop_process(follow, signal.SIGKILL)

    assert crictl.out("logs", "--tail", "1", cid) == "done\n"
    stamped = crictl.out("logs", "-t", "--tail", "1", cid)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) done\n", stamped)
    stderr_only = crictl.run("logs", "--stream", "stderr", cid)
    assert stderr_only.stdout == "" and stderr_only.stderr == "to-stderr\n"
    crictl.run("rm", cid)


def test_stats_statsp(crictl: Crictl, busybox_pod: Pod, worker: str) -> None:
    stats = crictl.json("stats", "--id", worker)["stats"]
    assert len(stats) == 1
    assert stats[0]["attributes"]["id"] == worker
    assert stats[0]["attributes"]["metadata"]["name"] == "worker"
    assert uint(stats[0]["cpu"]["usageCoreNanoSeconds"]) > 0
    assert uint(stats[0]["memory"]["workingSetBytes"]) > 0
    table = crictl.out("stats", "--id", worker).removeprefix("\x1b[2J\x1b[H")  # clear screen
    assert table.splitlines()[0].split()[:3] == ["CONTAINER", "NAME", "CPU"]
    assert any(line.split()[:2] == [worker[:13], "worker"] for line in table.splitlines()[1:])

    pod_stats = crictl.json("statsp", "--id", busybox_pod.id)["stats"]
    assert len(pod_stats) == 1
    assert pod_stats[0]["attributes"]["id"] == busybox_pod.id
    linux = pod_stats[0]["linux"]
    assert uint(linux["cpu"]["usageCoreNanoSeconds"]) > 0
    assert uint(linux["memory"]["workingSetBytes"]) > 0
    assert worker in [c["attributes"]["id"] for c in linux["containers"]]
    assert uint(linux["process"]["processCount"]) > 0


def test_statsp_network(crictl: Crictl, busybox_pod: Pod, worker: str) -> None:
    linux = crictl.json("statsp", "--id", busybox_pod.id)["stats"][0]["linux"]
    network = linux["network"]
    assert network["defaultInterface"]["name"] == "eth0", network
    assert uint(network["defaultInterface"]["rxBytes"]) > 0
    assert uint(network["timestamp"]) > 0


def test_update_resources(crictl: Crictl, worker: str) -> None:
    limit = 200 * 1024 * 1024
    assert crictl.out("update", "--memory", str(limit), "--cpu-period", "100000",
                      "--cpu-quota", "50000", worker).strip() == worker
    cgroup = crictl.out("exec", "-s", worker, "sh", "-c",
                        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max")
    assert cgroup.split("\n")[:2] == [str(limit), "50000 100000"], cgroup
    resources = crictl.json("inspect", worker)["status"]["resources"]["linux"]
    assert uint(resources["memoryLimitInBytes"]) == limit
    assert uint(resources["cpuQuota"]) == 50000


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_port_forward(crictl: Crictl, nginx_pod: Pod, transport: str) -> None:
    port = free_port()
    forward = crictl.popen("port-forward", "-r", transport, nginx_pod.id, f"{port}:80",
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
    output = Lines(forward.stdout)  # type: ignore[arg-type]
    try:
        output.wait_for(rf"Forwarding from 127\.0\.0\.1:{port} -> 80", timeout=30)
        for _ in range(3):  # each a new connection through the same forward
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
                assert resp.status == 200
                assert "<h1>Welcome to nginx!</h1>" in resp.read().decode()
    except (OSError, AssertionError) as exc:
        stop_process(forward)
        raise AssertionError(f"{exc!r}; crictl port-forward wrote {output.rest(5)}") from exc
    assert stop_process(forward) == 0, output.rest(5)
    assert output.rest(5).count(f"Handling connection for {port}") == 3, output.seen
    # nginx logs each request to its stdout: the requests reached it through the forward.
    access_log = crictl.out("logs", nginx_pod.containers["nginx"])
    assert access_log.count('"GET / HTTP/1.1" 200') >= 3, access_log


def test_stop_rm(crictl: Crictl, worker: str) -> None:
    assert crictl.out("stop", "--timeout", "20", worker).strip() == worker
    stopped = container(crictl, worker)
    assert stopped["state"] == "CONTAINER_EXITED"
    status = crictl.json("inspect", worker)["status"]
    assert status["exitCode"] == 0, "the container's SIGTERM trap did not run"
    assert "worker up\n" in crictl.out("logs", worker)
    assert worker not in crictl.out("ps", "-q", "--no-trunc").split()

    assert crictl.out("rm", worker).strip() == worker
    assert worker not in crictl.out("ps", "-a", "-q", "--no-trunc").split()
    gone = crictl.run("inspect", worker, expect_rc=1)
    assert "not found" in gone.stderr.lower() or "notfound" in gone.stderr.lower(), gone.stderr


def test_stopp_rmp(crictl: Crictl, busybox_pod: Pod, nginx_pod: Pod) -> None:
    # A pod stopped, then removed, as kubelet does it.
    assert "Stopped sandbox " + busybox_pod.id in crictl.out("stopp", busybox_pod.id)
    status = crictl.json("inspectp", busybox_pod.id)["status"]
    assert status["state"] == "SANDBOX_NOTREADY"
    row = next(line.split() for line in crictl.out("pods", "--no-trunc").splitlines()
               if line.startswith(busybox_pod.id))
    assert "NotReady" in row
    assert not vm_pids_of(busybox_pod.id), "the stopped pod's VM still runs"
    assert "Removed sandbox " + busybox_pod.id in crictl.out("rmp", busybox_pod.id)
    assert busybox_pod.id not in crictl.out("pods", "-q", "--no-trunc").split()
    crictl.run("inspectp", busybox_pod.id, expect_rc=1)

    # A ready pod with a running container, removed at once (`rmp -f` stops it first).
    nginx = crictl.out("ps", "-q", "--no-trunc", "--pod", nginx_pod.id).split()
    assert len(nginx) == 1
    assert "Removed sandbox " + nginx_pod.id in crictl.out("rmp", "-f", nginx_pod.id)
    assert crictl.out("pods", "-q", "--no-trunc") == ""
    assert crictl.out("ps", "-a", "-q", "--no-trunc") == ""
    assert not vm_pids_of(nginx_pod.id), "the removed pod's VM still runs"


def test_rmi(crictl: Crictl) -> None:
    crictl.run("pull", TEST_IMAGE)
    image_id = crictl.json("inspecti", TEST_IMAGE)["status"]["id"]
    assert re.search(rf"Deleted: {re.escape(TEST_IMAGE)}", crictl.out("rmi", TEST_IMAGE))
    assert image_id not in crictl.out("images", "-q", "--no-trunc").split()
    missing = crictl.run("inspecti", TEST_IMAGE, expect_rc=1)
    assert "no such image" in missing.stderr.lower(), missing.stderr

    # No pod is left: every image is unused, and `rmi --prune` removes them all.
    crictl.run("rmi", "--prune")
    assert crictl.json("images")["images"] == []
