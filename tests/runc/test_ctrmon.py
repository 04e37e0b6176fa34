"""ctrmon and its Python client, with the fake runc of conftest.py (and once with the real one).

The log it writes must be what criserver/runtime/container_log.py writes for the same bytes;
the exit record must land after the log is complete, whoever else dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from criserver.backends.runc.monitor import (
    STDERR,
    STDOUT,
    ExitRecord,
    Monitor,
    check_ctrmon,
    launch,
    read_exit,
)
from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.runtime.container_log import MAX_LINE, ContainerLog
from tests.runtime.test_container_log import Record, lines, parse_file

REAL_RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"


@dataclass
class Box:
    """A bundle for the fake runc: its workload, runc's root, the log path."""

    bundle: Path
    root: Path
    log: Path

    async def launch(
        self, ctrmon: str, runc: str, *, tty: bool = False, stdin: bool = False,
        stdin_once: bool = False, kill_all: bool = False,
    ) -> Monitor:
        return await launch(
            ctrmon, runc=runc, runc_root=self.root, bundle=self.bundle, container_id="c1",
            log_path=str(self.log), tty=tty, stdin=stdin, stdin_once=stdin_once,
            kill_all=kill_all,
        )


def make_box(tmp_path: Path, workload: str) -> Box:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "workload.sh").write_text(workload)
    return Box(bundle, tmp_path / "root", tmp_path / "logs" / "c1.log")


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def no_sanitizer_report(bundle: Path) -> None:
    diag = (bundle / "ctrmon.log").read_text() if (bundle / "ctrmon.log").exists() else ""
    assert "AddressSanitizer" not in diag and "runtime error" not in diag, diag


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def per_stream(records: list[Record]) -> dict[str, list[tuple[str, bytes]]]:
    out: dict[str, list[tuple[str, bytes]]] = {"stdout": [], "stderr": []}
    for r in records:
        out[r.stream].append((r.tag, r.content))
    return out


async def test_version(ctrmon_bin: str) -> None:
    assert await check_ctrmon(ctrmon_bin) == "ctrmon 1"
    with pytest.raises(FailedPrecondition, match="make ctrmon"):
        await check_ctrmon("/nonexistent/ctrmon")


async def test_log_format_matches_container_log(
    tmp_path: Path, ctrmon_asan: str, fake_runc: str
) -> None:
    out = (
        b"hello\n\n \nworld\n"
        + b"a" * (2 * MAX_LINE + 100) + b"\n"      # long line: P, P, F
        + b"b" * MAX_LINE + b"\n"                    # exactly the limit: one F
        + b"c" * (MAX_LINE + 1) + b"\n"              # one over: P, F
        + b"tail without newline"
    )
    err = b"e1\n" + b"x" * (MAX_LINE * 3 + 5)        # cut early into P records, rest P at EOF
    (tmp_path / "out.bin").write_bytes(out)
    (tmp_path / "err.bin").write_bytes(err)
    box = make_box(tmp_path, f"cat {tmp_path}/out.bin; cat {tmp_path}/err.bin >&2\n")
    m = await box.launch(ctrmon_asan, fake_runc)
    record = await m.wait()
    assert (record.exit_code, record.signal) == (0, 0)

    got = parse_file(box.log)
    ref_path = tmp_path / "ref.log"
    ref = ContainerLog(str(ref_path))
    await ref.write("stdout", out)
    await ref.write("stderr", err)
    await ref.close()
    assert per_stream(got) == per_stream(parse_file(ref_path))
    # Both streams end in an unfinished line: written as P records when the container ends.
    assert sorted(lines(got)[-2:]) == [("stderr", err[3:]), ("stdout", b"tail without newline")]
    assert stat.S_IMODE(box.log.stat().st_mode) == 0o640 & ~_umask()
    no_sanitizer_report(box.bundle)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


async def test_exit_code_and_files(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, "echo bye; exit 3\n")
    before = time.time_ns()
    m = await box.launch(ctrmon_bin, fake_runc)
    assert m.container_pid > 0 and m.pid > 0 and m.pid != m.container_pid
    record = await m.wait()
    assert record.exit_code == 3 and record.signal == 0
    assert before <= record.finished_at <= time.time_ns()
    assert read_exit(box.bundle) == record
    assert json.loads((box.bundle / "exit").read_text()) == {
        "exit_code": 3, "signal": 0, "finished_at": record.finished_at
    }
    assert [r.content for r in parse_file(box.log)] == [b"bye"]
    assert not (box.bundle / "ctl").exists(), "the control socket goes with the monitor"
    calls = (box.root / "calls").read_text()
    assert f"--log {box.bundle}/runc.log --log-format json create --bundle {box.bundle}" in calls
    assert f"--pid-file {box.bundle}/init.pid c1" in calls


async def test_killed_by_signal(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, "kill -KILL $$\n")
    m = await box.launch(ctrmon_bin, fake_runc)
    record = await m.wait()
    assert record == ExitRecord(137, 9, record.finished_at)


def test_read_exit_absent_and_corrupt(tmp_path: Path) -> None:
    assert read_exit(tmp_path) is None
    (tmp_path / "exit").write_text("{not json")
    record = read_exit(tmp_path)
    assert record is not None and record.exit_code == 255


async def test_create_failure_carries_runc_message(
    tmp_path: Path, ctrmon_bin: str, fake_runc: str
) -> None:
    box = make_box(tmp_path, "echo never\n")
    (box.bundle / "fail").write_text("container_linux.go:380: starting container: no such cgroup")
    with pytest.raises(FailedPrecondition, match="no such cgroup"):
        await box.launch(ctrmon_bin, fake_runc)
    (box.bundle / "fail").write_text("invalid mount destination")
    with pytest.raises(InvalidArgument, match="invalid mount"):
        await box.launch(ctrmon_bin, fake_runc)
    assert not (box.bundle / "exit").exists()


async def test_setup_failure_reported(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, "true\n")
    (tmp_path / "logs").write_text("a file where the log's directory should be")
    with pytest.raises(FailedPrecondition, match="cannot open container log"):
        await box.launch(ctrmon_bin, fake_runc)


async def test_reopen_after_rename(tmp_path: Path, ctrmon_asan: str, fake_runc: str) -> None:
    go = tmp_path / "go"
    box = make_box(
        tmp_path,
        f"echo before; printf 'half '; while [ ! -e {go} ]; do sleep 0.02; done; "
        "echo line; echo after\n",
    )
    m = await box.launch(ctrmon_asan, fake_runc)
    await until(lambda: box.log.exists() and b"before" in box.log.read_bytes())
    rotated = box.log.with_suffix(".log.1")
    box.log.rename(rotated)
    await m.reopen_log()
    go.touch()
    await m.wait()
    assert lines(parse_file(rotated)) == [("stdout", b"before")]
    # The unfinished line went to the new file.
    assert lines(parse_file(box.log)) == [("stdout", b"half line"), ("stdout", b"after")]
    no_sanitizer_report(box.bundle)


async def test_long_bundle_path(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    box = make_box(deep, f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done\n")
    assert len(str(box.bundle / "ctl")) > 108
    m = await box.launch(ctrmon_bin, fake_runc)
    await m.reopen_log()
    (tmp_path / "go").touch()
    assert (await m.wait()).exit_code == 0


async def test_attach_frames_and_stdin(tmp_path: Path, ctrmon_asan: str, fake_runc: str) -> None:
    box = make_box(tmp_path, "echo ready; echo warn >&2; cat; echo done\n")
    m = await box.launch(ctrmon_asan, fake_runc, stdin=True)
    await until(lambda: box.log.exists() and b"warn" in box.log.read_bytes())
    stream = await m.attach(stdin=True)
    await stream.send_stdin(b"hello\n")
    got: list[tuple[int, bytes]] = []
    frames = stream.frames()
    async for tag, data in frames:
        got.append((tag, data))
        if b"hello" in b"".join(d for _, d in got):
            break
    assert got and all(tag == STDOUT for tag, _ in got)
    await m.close_stdin()  # cat ends
    async for tag, data in frames:
        got.append((tag, data))
    stream.close()
    assert b"".join(d for t, d in got if t == STDOUT) == b"hello\ndone\n"
    assert (await m.wait()).exit_code == 0
    assert lines(parse_file(box.log)) == [
        ("stdout", b"ready"), ("stderr", b"warn"), ("stdout", b"hello"), ("stdout", b"done")
    ]
    no_sanitizer_report(box.bundle)


async def test_attach_sees_stderr(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; echo e >&2\n")
    m = await box.launch(ctrmon_bin, fake_runc)
    stream = await m.attach(stdin=False)
    (tmp_path / "go").touch()
    got = [f async for f in stream.frames()]  # ends when the container has exited
    stream.close()
    assert got == [(STDERR, b"e\n")]
    await m.wait()


async def test_stdin_once(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, "cat; echo eof\n")
    m = await box.launch(ctrmon_bin, fake_runc, stdin=True, stdin_once=True)
    watcher = await m.attach(stdin=False)
    writer = await m.attach(stdin=True)
    await writer.send_stdin(b"one\n")
    writer.close()  # the first client with stdin leaves: the container's stdin closes
    record = await asyncio.wait_for(m.wait(), 5)
    assert record.exit_code == 0
    out = b"".join([d async for _, d in watcher.frames()])
    watcher.close()
    assert out == b"one\neof\n"


async def test_stdin_stays_open_without_stdin_once(
    tmp_path: Path, ctrmon_bin: str, fake_runc: str
) -> None:
    box = make_box(tmp_path, "cat; echo eof\n")
    m = await box.launch(ctrmon_bin, fake_runc, stdin=True)
    writer = await m.attach(stdin=True)
    await writer.send_stdin(b"one\n")
    await writer.close_stdin()  # without --stdin-once: nothing happens
    writer.close()
    await until(lambda: box.log.exists() and b"one" in box.log.read_bytes())
    await asyncio.sleep(0.2)
    assert read_exit(box.bundle) is None
    await m.close_stdin()
    assert (await m.wait()).exit_code == 0
    assert lines(parse_file(box.log)) == [("stdout", b"one"), ("stdout", b"eof")]


async def test_tty(tmp_path: Path, ctrmon_asan: str, fake_runc: str) -> None:
    box = make_box(tmp_path, "read line; stty size; echo got:$line; echo err >&2\n")
    m = await box.launch(ctrmon_asan, fake_runc, tty=True, stdin=True)
    assert not (box.bundle / "console.sock").exists()
    await m.resize(30, 100)
    stream = await m.attach(stdin=True)
    await stream.resize(31, 101)
    await stream.send_stdin(b"x\n")
    got = [f async for f in stream.frames()]
    stream.close()
    assert {tag for tag, _ in got} == {STDOUT}
    output = b"".join(d for _, d in got)
    assert b"31 101" in output and b"got:x" in output and b"err" in output
    await m.wait()
    logged = lines(parse_file(box.log))
    assert {s for s, _ in logged} == {"stdout"}
    assert (b"got:x\r") in [line for _, line in logged]
    no_sanitizer_report(box.bundle)


async def test_kill_all_on_exit(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    # A leftover holds the pipes: without kill --all, EOF would wait for it.
    box = make_box(tmp_path, f"sleep 30 & echo $! > {tmp_path}/b/leftover; echo started\n")
    m = await box.launch(ctrmon_bin, fake_runc, kill_all=True)
    t0 = time.monotonic()
    assert (await m.wait()).exit_code == 0
    assert time.monotonic() - t0 < 1.5
    assert "kill --all c1 KILL" in (box.root / "calls").read_text()
    assert lines(parse_file(box.log)) == [("stdout", b"started")]


async def test_drain_is_bounded(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, f"sleep 30 & echo $! > {tmp_path}/b/leftover; echo started\n")
    m = await box.launch(ctrmon_bin, fake_runc)
    try:
        t0 = time.monotonic()
        assert (await m.wait()).exit_code == 0
        assert 1.8 < time.monotonic() - t0 < 4
        assert lines(parse_file(box.log)) == [("stdout", b"started")]
    finally:
        kill_quietly(int((box.bundle / "leftover").read_text()))


async def test_adopt(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; exit 4\n")
    launched = await box.launch(ctrmon_bin, fake_runc)
    pid, container_pid = launched.pid, launched.container_pid
    launched.close()
    del launched
    adopted = Monitor.adopt(box.bundle)
    assert adopted is not None
    assert (adopted.pid, adopted.container_pid) == (pid, container_pid)
    await adopted.reopen_log()
    # Another process with that pid (a different start time) is never taken.
    start = (box.bundle / "ctrmon.start").read_text()
    (box.bundle / "ctrmon.start").write_text(str(int(start) + 1))
    assert Monitor.adopt(box.bundle) is None
    (box.bundle / "ctrmon.start").write_text(start)
    (tmp_path / "go").touch()
    assert (await adopted.wait()).exit_code == 4
    assert Monitor.adopt(box.bundle) is None  # it has ended: read_exit is what is left


async def test_concurrent_waits(tmp_path: Path, ctrmon_bin: str, fake_runc: str) -> None:
    box = make_box(tmp_path, f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; exit 6\n")
    m = await box.launch(ctrmon_bin, fake_runc)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(m.wait(), 0.05)  # one waiter giving up stops no other
    waits = [asyncio.create_task(m.wait()) for _ in range(3)]
    (tmp_path / "go").touch()
    records = await asyncio.gather(*waits)
    assert {r.exit_code for r in records} == {6}
    assert await m.wait() == records[0]


async def test_slow_attach_client_is_dropped_not_the_log(
    tmp_path: Path, ctrmon_bin: str, fake_runc: str
) -> None:
    box = make_box(
        tmp_path,
        f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; "
        "head -c 8000000 /dev/zero | tr '\\0' a | fold -w 99\n",
    )
    m = await box.launch(ctrmon_bin, fake_runc)
    stream = await m.attach(stdin=False)  # never read while the container writes
    (tmp_path / "go").touch()
    assert (await asyncio.wait_for(m.wait(), 10)).exit_code == 0
    received = sum(len(d) for _, d in [f async for f in stream.frames()])
    stream.close()
    assert received < 8_000_000 + 8_000_000 // 99, "it was dropped"
    logged = lines(parse_file(box.log))
    assert len(logged) == 8_000_000 // 99 + 1
    assert all(line == b"a" * 99 for _, line in logged[:-1])


async def test_wait_reports_lost_when_monitor_dies(
    tmp_path: Path, ctrmon_bin: str, fake_runc: str
) -> None:
    box = make_box(tmp_path, "exec sleep 30\n")
    m = await box.launch(ctrmon_bin, fake_runc)
    try:
        os.kill(m.pid, signal.SIGKILL)
        record = await asyncio.wait_for(m.wait(), 5)
        assert (record.exit_code, record.signal) == (255, 0)
        assert read_exit(box.bundle) is None
    finally:
        kill_quietly(m.container_pid)


def test_pause_reaps_and_stops_on_sigterm(ctrmon_asan: str) -> None:
    # As PID 1 of a namespace it would inherit orphans; here it has one child of its own.
    pause = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep 0.1 & exec {ctrmon_asan} pause"], stderr=subprocess.PIPE
    )
    try:
        time.sleep(0.4)
        assert pause.poll() is None
        children = Path(f"/proc/{pause.pid}/task/{pause.pid}/children").read_text().split()
        assert children == [], "the sleep was reaped"
        pause.send_signal(signal.SIGTERM)
        assert pause.wait(5) == 0
        assert pause.stderr is not None and pause.stderr.read() == b""
    finally:
        pause.kill()
        pause.wait()


LAUNCHER = """\
import asyncio, sys
from pathlib import Path
from criserver.backends.runc.monitor import launch

async def main() -> None:
    ctrmon, runc, bundle, root, log = sys.argv[1:]
    await launch(ctrmon, runc=runc, runc_root=Path(root), bundle=Path(bundle),
                 container_id="c1", log_path=log)
    print("launched", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_launcher_killed_output_and_exit_still_land(
    tmp_path: Path, ctrmon_bin: str, fake_runc: str
) -> None:
    box = make_box(
        tmp_path,
        f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; "
        "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done; exit 5\n",
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ctrmon_bin, fake_runc, str(box.bundle), str(box.root),
         str(box.log)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.readline() == b"launched\n"
    finally:
        launcher.kill()
        launcher.wait()
    (tmp_path / "go").touch()
    await until(lambda: read_exit(box.bundle) is not None)
    record = read_exit(box.bundle)
    assert record is not None and record.exit_code == 5
    assert lines(parse_file(box.log)) == [("stdout", f"line {i}".encode()) for i in range(200)]


# --- the real runc -----------------------------------------------------------------------------


needs_real_runc = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(REAL_RUNC) or not os.path.exists(BUSYBOX),
    reason="needs root, /usr/sbin/runc and busybox-static",
)


def busybox_bundle(tmp_path: Path, args: list[str], terminal: bool = False) -> Path:
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir()
    subprocess.run([REAL_RUNC, "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = terminal
    spec["process"]["args"] = args
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


async def run_real(
    tmp_path: Path, ctrmon: str, bundle: Path, *, tty: bool = False
) -> tuple[ExitRecord, Path, list[tuple[int, bytes]]]:
    """Launch with Debian's runc, `runc start` (real create leaves the init waiting), wait."""
    root = tmp_path / "runc-root"
    cid = f"ctrmon-test-{os.getpid()}"
    log = tmp_path / "c.log"
    try:
        m = await launch(
            ctrmon, runc=REAL_RUNC, runc_root=root, bundle=bundle, container_id=cid,
            log_path=str(log), tty=tty, stdin=tty,
        )
        assert m.container_pid > 0
        frames: list[tuple[int, bytes]] = []
        stream = await m.attach(stdin=False) if tty else None
        if tty:
            await m.resize(25, 81)
        subprocess.run([REAL_RUNC, "--root", str(root), "start", cid], check=True)
        if stream is not None:
            frames = [f async for f in stream.frames()]
            stream.close()
        record = await asyncio.wait_for(m.wait(), 10)
        return record, log, frames
    finally:
        subprocess.run([REAL_RUNC, "--root", str(root), "delete", "--force", cid],
                       capture_output=True)


@needs_real_runc
async def test_real_runc(tmp_path: Path, ctrmon_bin: str) -> None:
    bundle = busybox_bundle(tmp_path, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    record, log, _ = await run_real(tmp_path, ctrmon_bin, bundle)
    assert (record.exit_code, record.signal) == (7, 0)
    assert sorted(lines(parse_file(log))) == [("stderr", b"err"), ("stdout", b"out")]


@needs_real_runc
async def test_real_runc_tty(tmp_path: Path, ctrmon_bin: str) -> None:
    bundle = busybox_bundle(tmp_path, ["sh", "-c", "busybox stty size; exit 2"], terminal=True)
    record, log, frames = await run_real(tmp_path, ctrmon_bin, bundle, tty=True)
    assert record.exit_code == 2
    assert frames == [(STDOUT, b"25 81\r\n")]
    assert lines(parse_file(log)) == [("stdout", b"25 81\r")]


async def test_real_runc_create_error(tmp_path: Path, ctrmon_bin: str) -> None:
    if os.geteuid() != 0 or not os.path.exists(REAL_RUNC):
        pytest.skip("needs root and /usr/sbin/runc")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run([REAL_RUNC, "spec", "--bundle", str(bundle)], check=True)  # no rootfs
    with pytest.raises((FailedPrecondition, InvalidArgument), match="rootfs"):
        await launch(
            ctrmon_bin, runc=REAL_RUNC, runc_root=tmp_path / "root", bundle=bundle,
            container_id=f"ctrmon-bad-{os.getpid()}", log_path=str(tmp_path / "c.log"),
        )

