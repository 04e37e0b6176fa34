"""Starts the real agent (`python -m vmagent`) as a host process for tests: over a simulated
virtio-serial port (pty, see portsim) or a Unix socket, optionally in fresh UTS + network
namespaces so SetupSandbox can set a hostname and sysctls without touching the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from tests.vmagent.portsim import PortSim

REPO = Path(__file__).resolve().parents[2]


class RunningAgent:
    def __init__(self, proc: asyncio.subprocess.Process, sock_path: str, log_path: Path,
                 port: PortSim | None) -> None:
        self.proc = proc
        self.sock_path = sock_path
        self.log_path = log_path
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self.port is not None:
            await self.port.close()


async def start_agent(
    workdir: Path,
    *,
    transport: str = "port",
    namespaces: bool = False,
    keep_open: bool = False,
    sock_name: str = "agent.sock",
    port: PortSim | None = None,
    extra_args: tuple[str, ...] = (),
) -> RunningAgent:
    """transport: "port" (pty port + QEMU-like socket) or "unix" (agent listens itself).
    `port`: an already listening PortSim (a "VM" whose host side accepts before the agent runs).
    """
    sock_path = port.sock_path if port is not None else str(workdir / sock_name)
    log_path = workdir / f"{Path(sock_path).name}.{len(list(workdir.glob('*.log')))}.log"
    pass_fds: tuple[int, ...] = ()
    if transport == "port":
        if port is None:
            port = PortSim(sock_path, keep_open=keep_open)
            await port.start()
        spec = f"fd:{port.master}"
        pass_fds = (port.master,)
    else:
        spec = f"unix:{sock_path}"
    argv = [sys.executable, "-m", "vmagent", f"--transport={spec}",
            f"--run_dir={workdir / 'run'}",
            # Only SIGIO may wake the agent up: the safety-net timer must not hide a bug.
            "--poll_interval=3600", *extra_args]
    if namespaces:
        argv = ["unshare", "--uts", "--net", "--", *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            pass_fds=pass_fds, env=env, cwd=str(REPO))
    if port is not None:
        port.agent_pid = proc.pid
    agent = RunningAgent(proc, sock_path, log_path, port)
    # The agent logs "ready" once it serves; waiting for it keeps tests free of sleeps.
    for _ in range(600):
        if "vmagent INFO ready" in agent.log():
            return agent
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    await agent.stop()
    raise RuntimeError(f"agent did not start:\n{agent.log()}")
