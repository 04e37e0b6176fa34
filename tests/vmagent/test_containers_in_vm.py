"""Containers in a real micro-VM (QEMU under TCG, the project's guest assets): an EROFS busybox
image reaches the guest over the 9p images share, runc runs containers on an overlay of it,
output comes back through ReadStdio, ExecSync runs inside containers, a shared volume carries
files between containers and the host, OOM kills are reported, stats and delete work.

One VM for the module (TCG boots are slow). Needs the guest assets with the loop module group
(`make guest`); CRISERVER_GUEST_ASSETS points at another assets dir.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criserver import errors
from criserver.backends.microvm.channel import AgentAddress, AgentClient
from criserver.backends.microvm.streams import exec_in_vm
from criserver.runtime.streaming.interface import TerminalSize
from criserver.vm import assets as assets_mod
from criserver.vm.vm import VM
from tests.vmagent.containerkit import busybox_rootfs, container_vm_spec, make_erofs, oci_spec
from vmagent.api import agent_pb2 as pb

pytestmark = pytest.mark.vm

ASSETS_DIR = Path(os.environ.get("CRISERVER_GUEST_ASSETS", assets_mod.DEFAULT_ASSETS_DIR))
SHARED_GUEST = "/run/criserver/shared"


class Pod:
    def __init__(self, machine: VM, client: AgentClient, image: str, shared: Path,
                 console: Path, runtime: str) -> None:
        self.machine = machine
        self.client = client
        self.image = image  # file name in the images share
        self.shared = shared  # host side of the pod's read-write share
        self.console = console  # the guest's console log: the agent's log lines
        self.runtime = runtime  # the OCI runtime the agent was told to use
        self.serial = 0

    async def call(self, name: str, req: object, timeout: float = 120) -> object:
        return await self.client.call(name, req, timeout=timeout)

    async def create(self, args: list[str], *, name: str = "", user: str = "",
                     spec: bytes | None = None, pid_namespace: int = 0, **kw: object) -> str:
        self.serial += 1
        cid = f"{name or 'c'}{self.serial}"
        await self.call("CreateContainer", pb.CreateContainerRequest(
            request_id=f"create-{cid}", container_id=cid, sandbox_id="pod1",
            oci_spec_json=spec or oci_spec(args, **kw),  # type: ignore[arg-type]
            rootfs=pb.Rootfs(lowers=[pb.Mount(type="erofs", source=f"image:{self.image}")]),
            user=user, pid_namespace=pid_namespace))  # type: ignore[arg-type]
        return cid

    async def run(self, args: list[str], **kw: object) -> tuple[str, pb.ExitStatus]:
        cid = await self.create(args, **kw)  # type: ignore[arg-type]
        await self.call("StartContainer", pb.StartContainerRequest(container_id=cid))
        status = await self.call("WaitContainer", pb.WaitContainerRequest(container_id=cid))
        assert isinstance(status, pb.ExitStatus)
        return cid, status

    async def output(self, cid: str, offset: int = 0) -> list[pb.StdioChunk]:
        """ReadStdio with follow: everything from `offset` to EOF."""
        request = pb.ReadStdioRequest(container_id=cid, offset=offset, follow=True)
        async with asyncio.timeout(60):
            return [chunk async for chunk in self.client.stream("ReadStdio", request)]

    async def exec(self, cid: str, *argv: str, timeout: float = 60,
                   **kw: object) -> pb.ExecSyncResponse:
        reply = await self.call("ExecSync", pb.ExecSyncRequest(
            container_id=cid, process=pb.Process(argv=list(argv), **kw),  # type: ignore[arg-type]
            timeout_seconds=timeout))
        assert isinstance(reply, pb.ExecSyncResponse)
        return reply

    async def delete(self, cid: str) -> None:
        await self.call("DeleteContainer", pb.DeleteContainerRequest(container_id=cid,
                                                                      force=True))


def _by_stream(chunks: list[pb.StdioChunk]) -> tuple[bytes, bytes]:
    out = b"".join(c.data for c in chunks if c.stream == pb.StdioChunk.STDOUT and not c.eof)
    err = b"".join(c.data for c in chunks if c.stream == pb.StdioChunk.STDERR and not c.eof)
    return out, err


async def _boot_pod(tmp_path_factory: pytest.TempPathFactory,
                    settings: dict[str, str]) -> AsyncIterator[Pod]:
    try:
        assets = assets_mod.load(ASSETS_DIR)
    except assets_mod.AssetsError as exc:
        pytest.skip(f"no guest assets: {exc}")
    for group in ("overlay", "9p", "loop"):
        if group not in assets.module_groups:
            pytest.skip(f"guest assets lack module group {group} (rebuild them)")
    work = Path(tmp_path_factory.mktemp("ctr", numbered=True))
    images = work / "images"
    shared = work / "shared"
    images.mkdir()
    shared.mkdir()
    image = make_erofs(busybox_rootfs(work / "rootfs"), images)
    spec = container_vm_spec(f"ctrtest-{os.getpid()}-{work.name}", work, assets, shared,
                             settings)
    machine = VM(spec)
    await machine.start()
    client = AgentClient(spec.vm_id, AgentAddress(unix_path=str(work / "agent.sock")),
                         call_timeout=120)
    try:
        await client.wait_ready(time.monotonic() + 180)
        await client.setup_sandbox(pb.SetupSandboxRequest(
            request_id="setup", sandbox_id="pod1", hostname="ctr-pod",
            resolv_conf="nameserver 10.96.0.10\n", hosts="127.0.0.1 localhost ctr-pod\n"))
        yield Pod(machine, client, image, shared, spec.log_file,
                  settings.get("oci_runtime", "crun"))
    finally:
        client.close()
        if not machine.exited:
            await machine.kill()
        log = spec.log_file.read_text(errors="replace") if spec.log_file.exists() else ""
        print(f"--- guest console ---\n{log[-3000:]}")


# What the daemon tells the agent under TCG: crun runs with fixed addresses.
FIXED = {"runtime_fixed_addresses": "1"}


@pytest.fixture(scope="module")
async def pod(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    async for p in _boot_pod(tmp_path_factory, FIXED):
        yield p


@pytest.fixture(scope="module")
async def runc_pod(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    """An agent told to run its containers with runc, and to exec through `runc exec` only
    (the path specs vmexec cannot serve take)."""
    async for p in _boot_pod(tmp_path_factory, {"oci_runtime": "runc", "exec_mode": "runtime"}):
        yield p


@pytest.fixture(scope="module")
async def crun_exec_pod(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    """The default runtime (crun) with every exec through `crun exec`."""
    async for p in _boot_pod(tmp_path_factory, {**FIXED, "exec_mode": "runtime"}):
        yield p


_EXEC_PODS = {"vmexec": "pod", "crun": "crun_exec_pod", "runc": "runc_pod"}


@pytest.fixture(params=list(_EXEC_PODS))
def exec_pod(request: pytest.FixtureRequest) -> Pod:
    return request.getfixturevalue(_EXEC_PODS[request.param])  # type: ignore[no-any-return]


@pytest.fixture(params=["pod", "runc_pod"])
def any_runtime_pod(request: pytest.FixtureRequest) -> Pod:
    """The default runtime's pod (crun), and runc's: both must give the same results."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


async def test_output_exit_code_and_delete(any_runtime_pod: Pod) -> None:
    pod = any_runtime_pod
    t0 = time.monotonic()
    cid = await pod.create(["sh", "-c", "echo out; echo err >&2; echo more; exit 3"])
    t1 = time.monotonic()
    await pod.call("StartContainer", pb.StartContainerRequest(container_id=cid))
    t2 = time.monotonic()
    print(f"create {t1 - t0:.3f}s start {t2 - t1:.3f}s (host-observed, incl. first-use setup)")
    # The agent ran the runtime it was told to (crun by default).
    assert f"container created id={cid} sandbox=pod1 runtime={pod.runtime} " in \
        pod.console.read_text(errors="replace")
    status = await pod.call("WaitContainer", pb.WaitContainerRequest(container_id=cid))
    assert isinstance(status, pb.ExitStatus)
    assert (status.exit_code, status.reason, status.oom_killed) == (3, "Error", False)
    assert status.finished_at_unix_nanos > 0
    chunks = await pod.output(cid)
    assert chunks[-1].eof
    assert _by_stream(chunks) == (b"out\nmore\n", b"err\n")
    # Offsets are contiguous across both streams, in arrival order.
    data = [c for c in chunks if not c.eof]
    assert data[0].offset == 0
    assert all(a.offset + len(a.data) == b.offset for a, b in itertools.pairwise(data))
    assert chunks[-1].offset == sum(len(c.data) for c in data) == 13
    # A reconnecting host asks again from what it persisted: no loss, no duplicates.
    again = await pod.output(cid, offset=4)
    assert b"".join(c.data for c in again) == b"".join(c.data for c in data)[4:]
    state = await pod.call("GetContainerState", pb.ContainerRequest(container_id=cid))
    assert isinstance(state, pb.ContainerState)
    assert state.status == pb.ContainerState.STOPPED and state.exit.exit_code == 3
    assert state.started_at_unix_nanos >= state.created_at_unix_nanos > 0
    await pod.delete(cid)
    await pod.delete(cid)  # idempotent
    with pytest.raises(errors.NotFound):
        await pod.call("GetContainerState", pb.ContainerRequest(container_id=cid))


# Blocks mkdir: proves the exec'd process got the container's seccomp filter.
SECCOMP = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
           "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                         "errnoRet": 1}]}


async def _exec_target(pod: Pod) -> str:
    """A running container with a seccomp filter and CAP_NET_RAW dropped."""
    spec = json.loads(oci_spec(["sleep", "100000"]))
    spec["linux"]["seccomp"] = SECCOMP
    spec["process"]["capabilities"]["bounding"].remove("CAP_NET_RAW")
    cid = await pod.create([], spec=json.dumps(spec).encode())
    await pod.call("StartContainer", pb.StartContainerRequest(container_id=cid))
    return cid


async def test_exec_sync_in_container(exec_pod: Pod) -> None:
    pod = exec_pod
    cid = await _exec_target(pod)
    try:
        r = await pod.exec(cid, "true")
        assert (r.exit_code, r.timed_out) == (0, False)
        r = await pod.exec(cid, "sh", "-c", "echo hi; echo oops >&2; exit 7")
        assert (r.exit_code, r.stdout, r.stderr) == (7, b"hi\n", b"oops\n")
        # In the container's PID namespace (its init is pid 1), mount namespace and pod files.
        r = await pod.exec(cid, "sh", "-c", "cat /proc/1/cmdline; echo; hostname; "
                           "cat /etc/resolv.conf")
        assert r.stdout.decode().split("\n")[:3] == [
            "sleep\x00100000\x00", "ctr-pod", "nameserver 10.96.0.10"], r
        # Its cgroup, capabilities (CAP_NET_RAW = bit 13 dropped), no_new_privs, rlimits.
        r = await pod.exec(cid, "sh", "-c", "cat /proc/self/cgroup; grep -E "
                           "'^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; ulimit -n")
        lines = r.stdout.decode().split("\n")
        assert lines[0] == f"0::/criserver/{cid}", r
        cap_eff = int(lines[1].split()[1], 16)
        cap_bnd = int(lines[2].split()[1], 16)
        assert cap_eff == cap_bnd and not cap_bnd & (1 << 13) and cap_bnd & (1 << 0), r
        assert lines[3].split() == ["NoNewPrivs:", "1"] and lines[4] == "1024", r
        r = await pod.exec(cid, "id", user=pb.User(uid=1000, gid=1000, additional_gids=[2000]))
        assert r.stdout == b"uid=1000(app) gid=1000(app) groups=2000(extra)\n", r
        r = await pod.exec(cid, "sh", "-c", "grep CapEff /proc/self/status",
                           user=pb.User(uid=1000, gid=1000))
        assert r.stdout.split()[1] == b"0000000000000000", r  # non-root: no effective caps
        r = await pod.exec(cid, "sh", "-c", "echo $FOO; pwd", env=["FOO=bar", "PATH=/bin"],
                           cwd="/tmp")
        assert r.stdout == b"bar\n/tmp\n", r
        r = await pod.exec(cid, "sh", "-c", "grep Seccomp: /proc/self/status; mkdir /tmp/made")
        assert r.stdout == b"Seccomp:\t2\n" and b"ermitted" in r.stderr, r
        # Timeout: the process is killed, and the answer says so.
        r = await pod.exec(cid, "sleep", "100", timeout=1)
        assert r.timed_out
        r = await pod.exec(cid, "sh", "-c", "ps -o comm | grep -c sleep")
        assert r.stdout == b"1\n", r  # only the container's init is left
        with pytest.raises(errors.CriError):
            await pod.exec(cid, "/no/such/binary")
        # Output caps.
        big = await pod.call("ExecSync", pb.ExecSyncRequest(
            container_id=cid, process=pb.Process(argv=["head", "-c", "100000", "/dev/zero"]),
            timeout_seconds=60, output_limit_bytes=1000))
        assert isinstance(big, pb.ExecSyncResponse)
        assert len(big.stdout) == 1000 and big.stdout_truncated
        times = []
        for _ in range(30):
            t0 = time.monotonic()
            await pod.exec(cid, "true")
            times.append(time.monotonic() - t0)
        times.sort()
        print(f"ExecSync true (host-observed): p50 "
              f"{statistics.median(times) * 1000:.1f} ms max of 30 {times[-1] * 1000:.1f} ms")
    finally:
        await pod.delete(cid)


class _Collect:
    def __init__(self) -> None:
        self.data = b""

    async def write(self, data: bytes) -> None:
        self.data += data

    async def close(self) -> None:
        pass


async def _chunks(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_exec_stream_in_container(exec_pod: Pod) -> None:
    """Interactive exec (kubectl exec) through the agent's Exec stream, with and without a
    terminal: stdin, output, exit code, and the container's seccomp filter."""
    pod = exec_pod
    cid = await _exec_target(pod)
    try:
        out, err = _Collect(), _Collect()
        code = await asyncio.wait_for(exec_in_vm(
            pod.client, cid, ["sh", "-c", "cat; grep Seccomp: /proc/self/status; "
                              "mkdir /tmp/x; exit 5"], tty=False,
            stdin=_chunks(b"from stdin\n"), stdout=out, stderr=err, resize=None), 60)
        assert code == 5 and out.data == b"from stdin\nSeccomp:\t2\n", out.data
        assert b"ermitted" in err.data, err.data

        async def sizes() -> AsyncIterator[TerminalSize]:
            yield TerminalSize(width=91, height=27)

        out = _Collect()
        code = await asyncio.wait_for(exec_in_vm(
            pod.client, cid, ["sh", "-c", "stty size; tty; exit 3"], tty=True, stdin=None,
            stdout=out, stderr=None, resize=sizes()), 60)
        assert code == 3 and b"27 91" in out.data and b"/dev/pts/" in out.data, out.data
    finally:
        await pod.delete(cid)


async def test_user_name_resolved_from_image(pod: Pod) -> None:
    cid, status = await pod.run(["id"], user="app")
    out, _ = _by_stream(await pod.output(cid))
    assert status.exit_code == 0
    assert out.decode().startswith("uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)")
    await pod.delete(cid)
    with pytest.raises(errors.InvalidArgument):
        await pod.create(["id"], user="nobody-here")


async def test_shared_volume(pod: Pod) -> None:
    (pod.shared / "vol1").mkdir()
    (pod.shared / "vol1").chmod(0o777)
    mounts = [{"destination": "/data/vol", "type": "bind", "source": f"{SHARED_GUEST}/vol1",
               "options": ["rbind", "rw"]}]
    writer, st = await pod.run(["sh", "-c", "echo from-writer > /data/vol/hello"],
                               mounts=mounts)
    assert st.exit_code == 0
    assert (pod.shared / "vol1" / "hello").read_text() == "from-writer\n"
    reader, st = await pod.run(["cat", "/data/vol/hello"], mounts=mounts)
    out, _ = _by_stream(await pod.output(reader))
    assert (st.exit_code, out) == (0, b"from-writer\n")
    for cid in (writer, reader):
        await pod.delete(cid)


async def test_oom_killed(pod: Pod) -> None:
    # The shell keeps 64 MB in a variable; the limit is 16 MiB.
    cid, status = await pod.run(
        ["sh", "-c", "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived"],
        memory_limit=16 * 1024 * 1024)
    assert status.reason == "OOMKilled" and status.oom_killed, status
    await pod.delete(cid)


async def test_stats_update(any_runtime_pod: Pod) -> None:
    pod = any_runtime_pod
    cid = await pod.create(["sh", "-c", "while :; do :; done"])
    idle = await pod.create(["sleep", "100000"])
    try:
        for c in (cid, idle):
            await pod.call("StartContainer", pb.StartContainerRequest(container_id=c))
        reply = await pod.client.stats(pb.StatsRequest(container_ids=[cid]))
        (s,) = reply.containers
        assert s.container_id == cid
        assert s.cpu_usage_nanos > 0 and s.memory_usage_bytes > 0 and s.pids >= 1, s
        assert reply.guest.memory_total_bytes > 0
        await pod.call("UpdateResources", pb.UpdateResourcesRequest(
            container_id=cid, linux_resources_json=json.dumps(
                {"pids": {"limit": 50}}).encode()))
        limit = await pod.call("ExecSync", pb.ExecSyncRequest(process=pb.Process(
            argv=["cat", f"/sys/fs/cgroup/criserver/{cid}/pids.max"]), timeout_seconds=30))
        assert limit.stdout == b"50\n", limit  # type: ignore[attr-defined]
        await pod.call("SignalContainer", pb.SignalContainerRequest(container_id=cid, signal=9))
        st = await pod.call("WaitContainer", pb.WaitContainerRequest(container_id=cid))
        assert (st.exit_code, st.signal) == (137, 9)  # type: ignore[attr-defined]
    finally:
        for c in (cid, idle):
            await pod.delete(c)


async def test_pod_shared_pid_namespace(pod: Pod) -> None:
    first = await pod.create(["sleep", "4242"], pid_namespace=pb.CreateContainerRequest.PID_POD)
    await pod.call("StartContainer", pb.StartContainerRequest(container_id=first))
    try:
        second, st = await pod.run(["sh", "-c", "ps -o args | grep -c '^sleep 4242'"],
                                   pid_namespace=pb.CreateContainerRequest.PID_POD)
        out, _ = _by_stream(await pod.output(second))
        assert (st.exit_code, out) == (0, b"1\n")
        await pod.delete(second)
        # Its own PID namespace by default: the pod's processes are not visible.
        alone, st = await pod.run(["sh", "-c", "ps -o args | grep -c '^sleep 4242'"])
        out, _ = _by_stream(await pod.output(alone))
        assert out == b"0\n"
        await pod.delete(alone)
    finally:
        await pod.delete(first)


async def test_workloads_keep_address_randomisation(exec_pod: Pod) -> None:
    """crun runs with ADDR_NO_RANDOMIZE under TCG; the container's processes, started by it
    or exec'd later (vmexec, crun exec, runc exec), have the default personality."""
    cid, st = await exec_pod.run(["cat", "/proc/self/personality"])
    out, err = _by_stream(await exec_pod.output(cid))
    assert (st.exit_code, out, err) == (0, b"00000000\n", b"")
    await exec_pod.delete(cid)
    sleeper = await exec_pod.create(["sleep", "100000"])
    try:
        await exec_pod.call("StartContainer", pb.StartContainerRequest(container_id=sleeper))
        reply = await exec_pod.exec(sleeper, "cat", "/proc/self/personality")
        assert (reply.exit_code, reply.stdout) == (0, b"00000000\n"), reply
        reply = await exec_pod.exec(sleeper, "cat", "/proc/1/personality")
        assert (reply.exit_code, reply.stdout) == (0, b"00000000\n"), reply
    finally:
        await exec_pod.delete(sleeper)


async def test_the_containers_own_process_gets_its_seccomp_filter(any_runtime_pod: Pod) -> None:
    """crun loads the program the agent compiled once (run.oci.seccomp_bpf_data), runc
    compiles its own: either way the init runs filtered."""
    pod = any_runtime_pod
    spec = json.loads(oci_spec(["sh", "-c", "grep Seccomp: /proc/self/status; mkdir /tmp/made"]))
    spec["linux"]["seccomp"] = SECCOMP
    cid = await pod.create([], spec=json.dumps(spec).encode())
    await pod.call("StartContainer", pb.StartContainerRequest(container_id=cid))
    status = await pod.call("WaitContainer", pb.WaitContainerRequest(container_id=cid))
    out, err = _by_stream(await pod.output(cid))
    assert (out, status.exit_code) == (b"Seccomp:\t2\n", 1), (out, err)  # type: ignore[attr-defined]
    assert b"ermitted" in err, err
    await pod.delete(cid)
