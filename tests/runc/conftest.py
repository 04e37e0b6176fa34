"""ctrmon built once per session (plain and with ASan+UBSan), and a fake runc to run it with.

The fake stands in for `runc create`: it starts BUNDLE/workload.sh at once (no `runc start`),
as the container's init with the stdio ctrmon gave it (or a pty sent over --console-socket),
writes its pid to --pid-file and exits. BUNDLE/fail makes it fail the way runc does (a JSON
error line in --log). `kill --all` kills the pids listed in BUNDLE/leftover. Every call is
appended to ROOT/calls.
"""

from __future__ import annotations

import sys

import pytest

from criserver.backends.runc.build import build_ctrmon

FAKE_RUNC = """\
#!{python}
import fcntl, json, os, signal, socket, sys, termios

args = sys.argv[1:]
root = args[args.index("--root") + 1]
os.makedirs(root, exist_ok=True)
with open(os.path.join(root, "calls"), "a") as f:
    f.write(" ".join(args) + "\\n")
command = next(i for i, a in enumerate(args) if a in ("create", "kill"))

def opt(name):
    return args[args.index(name) + 1] if name in args else None

if args[command] == "kill":
    cid = args[command + 2]
    bundle = open(os.path.join(root, cid + ".bundle")).read()
    try:
        pids = open(os.path.join(bundle, "leftover")).read().split()
    except FileNotFoundError:
        pids = []
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(0)

bundle, pid_file, console = opt("--bundle"), opt("--pid-file"), opt("--console-socket")
cid = args[-1]
with open(os.path.join(root, cid + ".bundle"), "w") as f:
    f.write(bundle)
fail = os.path.join(bundle, "fail")
if os.path.exists(fail):
    with open(opt("--log"), "a") as f:
        f.write(json.dumps({{"level": "error", "msg": open(fail).read(), "time": "now"}}) + "\\n")
    print("fake runc: create failed", file=sys.stderr)
    sys.exit(1)
workload = ["/bin/sh", os.path.join(bundle, "workload.sh")]
if console:
    master, slave = os.openpty()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.execv(workload[0], workload)
    os.close(slave)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(console)
    socket.send_fds(s, [b"/dev/pts/fake"], [master])
    s.close()
else:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.execv(workload[0], workload)
with open(pid_file, "w") as f:
    f.write(str(pid))
"""


@pytest.fixture(scope="session")
def ctrmon_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("ctrmon") / "ctrmon"
    build_ctrmon(out)
    return str(out)


@pytest.fixture(scope="session")
def ctrmon_asan(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("ctrmon-asan") / "ctrmon"
    build_ctrmon(out, sanitize=True)
    return str(out)


@pytest.fixture(scope="session")
def fake_runc(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fake-runc") / "runc"
    path.write_text(FAKE_RUNC.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)
