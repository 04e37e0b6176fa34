"""Starts the real criserver daemon as a process on a temporary socket, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.cri_client import REPO, CRIClient

INERT_BACKEND = "tests.backends.inert:InertBackend"
INERT_CONFIG = (
    f'[runtime]\ndefault_handler = "inert"\n[runtimes.inert]\nbackend = "{INERT_BACKEND}"\n'
)


class Daemon:
    def __init__(self, workdir: Path, config: str | None = None) -> None:
        self.workdir = workdir
        self.socket = workdir / "criserver.sock"
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "daemon.log"
        self.config_path.write_text(
            f'[daemon]\nlisten = "unix://{self.socket}"\nroot = "{self.root}"\n'
            f'state = "{self.state}"\nlog_level = "debug"\nshutdown_timeout = 5\n'
            + (config if config is not None else INERT_CONFIG)
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30, env: dict[str, str] | None = None) -> Daemon:
        """`env`: more environment variables for the daemon (e.g. armed failpoints)."""
        env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "criserver", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=log, env=env, cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if self._connectable():
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def _connectable(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
            return True

    def client(self) -> CRIClient:
        return CRIClient(self.socket)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """Kill the daemon and end the mounts it keeps for VMs across restarts (its volumes
        directory): what a test does at the end, never in the middle."""
        self.kill()
        unmount_under(self.workdir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def built_templates(state: Path) -> list[Path]:
    """The state files of the templates a daemon with state dir `state` has published. A
    build writes its state file into <key>.tmp before the rename that publishes it: that one
    is not built yet."""
    return [f for f in state.glob("runtimes/*/templates/*/state")
            if not f.parent.name.endswith(".tmp")]


def unmount_under(workdir: Path) -> None:
    """Lazily unmount everything mounted below `workdir`, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{workdir}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def process_cmdlines() -> dict[int, str]:
    """Every live process of the host: pid -> command line (arguments joined by spaces)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue  # gone meanwhile
    return found
