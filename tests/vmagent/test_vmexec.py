"""vmexec (guest/vmexec.c), the agent's exec helper, run on the host against a real "container":
a process in its own PID, UTS, IPC and mount namespaces and a real cgroup v2 group. The exec'd
process reports what it got from /proc, so each test checks what the kernel applied, not what we
asked for. The same binary and the same fastexec planning run in the guest (tests/e2e cover
that path inside micro-VMs). Also its fixed-addresses launcher, through which the agent runs
crun under TCG, and its pid1, the init of a pod's shared PID namespace."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpclib.const import Status

from guest import build as guestbuild
from vmagent import fastexec
from vmagent.ociruntime import OciRuntime, OciRuntimeError, runtime_binary
from vmagent.pid1 import ChildExit
from vmagent.podns import PodNamespaces

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

CGROUP2 = Path("/sys/fs/cgroup/unified")
ADDR_NO_RANDOMIZE = 0x0040000
REPORT = "cat /proc/self/status; echo ulimit=$(ulimit -n); echo cwd=$(pwd); echo foo=$FOO; " \
         "echo host=$(hostname); echo pid=$$; cat /proc/self/cgroup"


@pytest.fixture(scope="module")
def vmexec(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("vmexec") / "vmexec"
    guestbuild.build_vmexec(out)  # the guest image's build step, on the host
    return str(out)


@dataclass
class FakeContainer:
    init_pid: int
    cgroup_dir: str


@pytest.fixture
def container() -> Iterator[FakeContainer]:
    """An init in fresh namespaces, with a cgroup v2 group for exec'd processes."""
    if not (CGROUP2 / "cgroup.procs").exists():
        pytest.skip(f"no cgroup2 mount at {CGROUP2}")
    cgroup = CGROUP2 / f"crs-vmexec-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--uts", "--ipc", "--mount", "--mount-proc", "sh", "-c",
         "hostname crs-vmexec && echo ready && exec sleep 120"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        yield FakeContainer(int(children[0]), str(cgroup))
    finally:
        proc.kill()
        proc.wait()
        for _ in range(50):  # exec'd processes are gone once their parents are reaped
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _process(argv: list[str], **extra: object) -> dict[str, object]:
    caps = ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
    base: dict[str, object] = {
        "args": argv, "env": ["FOO=bar", "PATH=/usr/bin:/bin"], "cwd": "/tmp",
        "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
    }
    return {**base, **extra}


def _run(vmexec: str, c: FakeContainer, process: dict[str, object],
         seccomp: dict[str, object] | None = None) -> tuple[ChildExit, str, str, int, str]:
    """(exit, stdout, stderr, reported pid, reported error) of one exec."""
    spec = {"process": process, "linux": {"seccomp": seccomp} if seccomp else {}}
    plan = fastexec.plan(spec, process, c.init_pid, c.cgroup_dir, vmexec)
    assert plan is not None
    bpf = b""
    if plan.seccomp_rules:
        bpf = asyncio.run(fastexec.compile_filter(plan, _WaitpidReaper()))  # type: ignore[arg-type]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid, report_r = fastexec.spawn(plan, out_w, err_w, seccomp_filter=bpf)
    finally:
        os.close(out_w)
        os.close(err_w)
    with os.fdopen(report_r, "rb") as f:
        target, error = fastexec.parse_report(f.read())
    # vmexec is done once the process runs; the process is our child (CLONE_PARENT).
    assert ChildExit(os.waitpid(pid, 0)[1]).code == 0
    assert target > 0 and target != pid
    with os.fdopen(out_r, "rb") as o, os.fdopen(err_r, "rb") as e:
        out, err = o.read().decode(), e.read().decode()
    return ChildExit(os.waitpid(target, 0)[1]), out, err, target, error


class _WaitpidReaper:
    """Test double for the agent's PID-1 reaper: waits for one pid in a thread."""

    def watch(self, pid: int) -> asyncio.Future[ChildExit]:
        return asyncio.get_running_loop().run_in_executor(
            None, lambda: ChildExit(os.waitpid(pid, 0)[1]))


def _status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def _values(text: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and ":" not in ln)


def test_exec_enters_namespaces_and_cgroup(vmexec: str, container: FakeContainer) -> None:
    status, out, err, target, error = _run(vmexec, container, _process(["sh", "-c", REPORT]))
    assert (status.code, error, err) == (0, "", "")
    v = _values(out)
    assert v["host"] == "crs-vmexec" and v["cwd"] == "/tmp" and v["foo"] == "bar"
    assert int(v["pid"]) < 10  # numbered inside the container's PID namespace
    assert target != int(v["pid"])  # reported as the agent sees it
    for ns in ("pid", "uts", "ipc", "mnt"):
        assert os.readlink(f"/proc/{container.init_pid}/ns/{ns}") != os.readlink(
            f"/proc/self/ns/{ns}")
    assert f"0::/{Path(container.cgroup_dir).name}" in out


def test_exec_drops_to_the_user_capabilities_and_limits(vmexec: str,
                                                        container: FakeContainer) -> None:
    process = _process(
        ["sh", "-c", REPORT], user={"uid": 1000, "gid": 1001, "additionalGids": [5, 6]},
        capabilities={"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"],
                      "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"],
                      "ambient": ["CAP_KILL"]},
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}],
        noNewPrivileges=True, oomScoreAdj=500)
    status, out, err, _, error = _run(vmexec, container, process)
    assert (status.code, error, err) == (0, "", "")
    st = _status(out)
    assert st["Uid"].split() == ["1000"] * 4 and st["Gid"].split() == ["1001"] * 4
    assert st["Groups"].split() == ["5", "6"]
    assert int(st["CapBnd"], 16) == 1 << 0 | 1 << 5
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapAmb"], 16) == 1 << 5
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "0"
    assert _values(out)["ulimit"] == "123"


def test_seccomp_profile_is_enforced(vmexec: str, container: FakeContainer) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": 13},
                            {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"}]}
    target = f"/tmp/crs-vmexec-{uuid.uuid4().hex[:8]}"
    argv = ["sh", "-c", f"grep Seccomp: /proc/self/status; mkdir {target}"]
    # With no_new_privs the filter goes in last; without it, before dropping to the user.
    for nnp, user in ((True, {"uid": 0, "gid": 0}), (False, {"uid": 1000, "gid": 1000})):
        status, out, err, _, error = _run(
            vmexec, container, _process(argv, noNewPrivileges=nnp, user=user), profile)
        assert error == "" and status.code == 1, (out, err)
        assert "Seccomp:\t2" in out and "Permission denied" in err
        assert not os.path.exists(target)
    status, out, _, _, _ = _run(vmexec, container, _process(argv))  # no profile: allowed
    assert status.code == 0 and "Seccomp:\t0" in out
    os.rmdir(target)


def test_bad_seccomp_profile_is_refused(vmexec: str) -> None:
    plan = fastexec.plan({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
                                                "architectures": ["SCMP_ARCH_NOPE"]}}},
                         _process(["true"]), os.getpid(), "/x", vmexec)
    assert plan is not None
    with pytest.raises(Exception, match="unknown architecture nope"):
        asyncio.run(fastexec.compile_filter(plan, _WaitpidReaper()))  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "extra", "message"), [
    (["/no/such/binary"], {}, "exec /no/such/binary: No such file or directory"),
    (["true"], {"cwd": "/no/such/dir"}, "cwd /no/such/dir: No such file or directory"),
])
def test_failures_are_reported(vmexec: str, container: FakeContainer, argv: list[str],
                               extra: dict[str, object], message: str) -> None:
    status, _, _, target, error = _run(vmexec, container, _process(argv, **extra))
    assert status.code == 127 and error == message and target > 0


def test_report_ends_once_the_process_runs(vmexec: str, container: FakeContainer) -> None:
    """The agent waits for the report's end before it relays stdin: the exec'd process must
    not keep the report (or any fd of vmexec's own) open."""
    process = _process(["sh", "-c", "ls -l /proc/self/fd; read line; echo got $line"])
    plan = fastexec.plan({"process": process, "linux": {}}, process, container.init_pid,
                         container.cgroup_dir, vmexec)
    assert plan is not None
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    helper, report_r = fastexec.spawn(plan, out_w, out_w, stdin=in_r)
    os.close(in_r)
    os.close(out_w)
    ready, _, _ = select.select([report_r], [], [], 10)
    record = os.read(report_r, 100)
    assert ready and record[:1] == b"P"
    ready, _, _ = select.select([report_r], [], [], 10)
    assert ready and os.read(report_r, 100) == b""  # ended while `read` still waits
    os.write(in_w, b"hello\n")
    os.close(in_w)
    with os.fdopen(out_r, "rb") as f:
        out = f.read().decode()
    os.waitpid(helper, 0)
    target = fastexec.parse_report(record)[0]
    assert ChildExit(os.waitpid(target, 0)[1]).code == 0 and out.endswith("got hello\n")
    fds = [ln.split()[-3] for ln in out.splitlines() if " -> " in ln]
    assert fds == ["0", "1", "2", "3"], out  # stdio, and the fd ls opened for the listing
    os.close(report_r)


def test_exit_codes_and_signals_pass_through(vmexec: str, container: FakeContainer) -> None:
    assert _run(vmexec, container, _process(["sh", "-c", "exit 7"]))[0].code == 7
    killed = _run(vmexec, container, _process(["sh", "-c", "kill -9 $$"]))[0]
    assert (killed.code, killed.signal) == (128 + 9, 9)


def test_fixed_addresses_sets_no_randomize_for_the_program_only(vmexec: str) -> None:
    done = subprocess.run([vmexec, "fixed-addresses", "--", "/bin/cat", "/proc/self/personality"],
                          capture_output=True, text=True, check=True)
    assert int(done.stdout, 16) & ADDR_NO_RANDOMIZE
    with open("/proc/self/personality") as f:
        assert not int(f.read(), 16) & ADDR_NO_RANDOMIZE
    bad = subprocess.run([vmexec, "fixed-addresses", "--", "/nonexistent"],
                         capture_output=True, text=True)
    assert bad.returncode == 127 and "/nonexistent" in bad.stderr
    usage = subprocess.run([vmexec, "fixed-addresses", "/bin/true"], capture_output=True)
    assert usage.returncode == 2


async def test_the_oci_runtime_runs_through_the_launcher(vmexec: str, tmp_path: Path) -> None:
    """A real runtime call through the launcher: `--version` answers, and starting an unknown
    container is NOT_FOUND (crun's wording when crun is installed, else runc's)."""
    binary = runtime_binary()
    if not os.access(binary, os.X_OK):
        pytest.skip("neither crun nor runc installed")
    runtime = OciRuntime(_WaitpidReaper(), binary,  # type: ignore[arg-type]
                         root=str(tmp_path / "state"), launcher=(vmexec, "fixed-addresses", "--"))
    assert b"version" in await runtime.run(["--version"], what="version")
    with pytest.raises(OciRuntimeError) as err:
        await runtime.run(["start", "nosuch"], what="start")
    assert err.value.status == Status.NOT_FOUND, err.value.message


async def test_pid1_is_the_init_of_a_pid_namespace_and_reaps_its_orphans(vmexec: str) -> None:
    """The pod's shared PID namespace: `vmexec pid1`, started once through PodNamespaces, is
    PID 1 there, outlives a SIGTERM, and reaps what is orphaned in its namespace."""
    podns = PodNamespaces(_WaitpidReaper(), vmexec)  # type: ignore[arg-type]
    pid1 = await podns.pid()
    try:
        assert await podns.pid() == pid1
        assert _status(Path(f"/proc/{pid1}/status").read_text())["NSpid"].split()[-1] == "1"
        children = Path(f"/proc/{pid1}/task/{pid1}/children")
        subprocess.run(["nsenter", f"--target={pid1}", "--pid", "--", "sh", "-c",
                        "sleep 1 & exit 0"], check=True)
        assert children.read_text().split(), "the orphaned sleep is pid 1's child"
        os.kill(pid1, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while children.read_text().split() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert children.read_text().split() == []  # exited and reaped, no zombie left
        assert Path(f"/proc/{pid1}/comm").read_text() == "vmexec\n"  # SIGTERM changed nothing
    finally:
        os.kill(pid1, signal.SIGKILL)
