"""Build `ctrmon` (ctrmon.c beside this file): static and stripped like guest/vmexec.c, so it
runs on any host whatever its libc, and keeps running across upgrades of the daemon's Python.

`python -m criserver.backends.runc.build [OUT]` installs it (default: monitor.DEFAULT_CTRMON).
A build tool, run by `make ctrmon` and the tests: it blocks, and never runs in the daemon's loop.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from criserver.backends.runc.monitor import DEFAULT_CTRMON

CC = "gcc"
SOURCE = Path(__file__).resolve().parent / "ctrmon.c"


class BuildError(Exception):
    pass


def build_ctrmon(out: Path, sanitize: bool = False) -> None:
    """Compile ctrmon to `out` (replaced atomically). `sanitize`: ASan+UBSan, dynamic, for tests."""
    flags = (
        ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        if sanitize
        else ["-O2", "-static", "-s"]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, then renamed: a running monitor keeps its old binary untouched.
    fd, tmp = tempfile.mkstemp(prefix=".ctrmon.", dir=out.parent)
    os.close(fd)
    argv = [CC, *flags, "-Wall", "-Werror", "-o", tmp, str(SOURCE)]
    try:
        subprocess.run(argv, check=True, capture_output=True)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace").strip()[-2000:]
        raise BuildError(f"compile ctrmon: {CC} exited {exc.returncode}: {err}") from exc
    except FileNotFoundError as exc:
        raise BuildError(f"compile ctrmon: {CC} not found (apt-get install gcc libc6-dev)") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m criserver.backends.runc.build", description=__doc__
    )
    ap.add_argument("out", nargs="?", type=Path, default=Path(DEFAULT_CTRMON))
    args = ap.parse_args(argv)
    try:
        build_ctrmon(args.out)
    except BuildError as exc:
        print(f"ctrmon build failed: {exc}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
