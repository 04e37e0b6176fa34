"""PID 1 of a hostile test guest (tests/e2e/test_hostile_guest_vm.py): what an attacker with
root in a pod's VM can do to the host's side of the agent channel.

The real agent runs as this process's child and serves over one end of a socketpair
(`--transport=fd:N`); this process owns the virtio-serial port and relays bytes both ways, so
until it is told otherwise the pod works as any other. The host turns it hostile by sending
`criserver-hostile=<mode>` (a container's env var does it: protobuf strings travel as they are):

- `garbage`: the agent's answers are dropped and random bytes go to the host instead;
- `stall`: nothing is relayed any more in either direction (a wedged guest).

Standard library only (it runs in the guest's python3, before and beside the agent). It must
never exit: PID 1 exiting panics the guest kernel.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

MARK = b"criserver-hostile="
MODES = (b"garbage", b"stall")
GARBAGE_BYTES = 32 << 20  # sent once, as fast as the port takes it
CHUNK = 64 * 1024


def log(text: str) -> None:
    print(f"hostile-init: {text}", file=sys.stderr, flush=True)  # the guest console


class Relay:
    def __init__(self, port: int, agent: socket.socket) -> None:
        self.port = port
        self.agent = agent
        self.to_host = bytearray()
        self.to_agent = bytearray()
        self.tail = b""  # the end of what the host sent, so a mark split across reads is seen
        self.mode = b""
        self.host_gone_until = 0.0
        self.garbage_sent = 0

    def run(self) -> None:
        while True:
            if self.mode == b"stall":
                time.sleep(3600)
                continue
            port_open = time.monotonic() >= self.host_gone_until
            readable = [self.agent] + ([self.port] if port_open else [])
            writable = ([self.agent] if self.to_agent else []) + (
                [self.port] if port_open and (self.to_host or self._garbage_left()) else [])
            r, w, _ = select.select(readable, writable, [], 0.05)
            if self.port in r:
                self._from_host()
            if self.agent in r:
                data = self.agent.recv(CHUNK)
                if self.mode != b"garbage":
                    self.to_host += data
            if self.agent in w:
                del self.to_agent[: self.agent.send(self.to_agent)]
            if self.port in w:
                self._to_host()

    def _garbage_left(self) -> bool:
        return self.mode == b"garbage" and self.garbage_sent < GARBAGE_BYTES

    def _from_host(self) -> None:
        try:
            data = os.read(self.port, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # no host connected: the port reads EOF until one is (see vmagent/port.py)
            self.host_gone_until = time.monotonic() + 0.05
            return
        seen = self.tail + data
        self.tail = seen[-64:]
        at = seen.find(MARK)
        if at >= 0 and not self.mode:
            mode = next((m for m in MODES if seen[at + len(MARK):].startswith(m)), b"")
            if mode:
                self.mode = mode
                self.to_host.clear()
                log(f"turning hostile: {mode.decode()}")
        if self.mode != b"garbage":
            self.to_agent += data

    def _to_host(self) -> None:
        if self._garbage_left():
            chunk = os.urandom(CHUNK)
        else:
            chunk = bytes(self.to_host[:CHUNK])
        try:
            sent = os.write(self.port, chunk)
        except BlockingIOError:
            return
        except OSError:
            self.host_gone_until = time.monotonic() + 0.05
            return
        if self._garbage_left():
            self.garbage_sent += sent
        else:
            del self.to_host[:sent]


def main() -> None:
    from vmagent.port import find_port
    from vmagent.settings import load

    settings = load([])
    path = find_port(settings.port_name)
    port = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    ours, theirs = socket.socketpair()
    agent = subprocess.Popen([sys.executable, "-m", "vmagent", f"--transport=fd:{theirs.fileno()}"],
                             pass_fds=[theirs.fileno()])
    theirs.close()
    ours.setblocking(False)
    log(f"relaying {path} to the agent (pid {agent.pid})")
    Relay(port, ours).run()


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # never exit: PID 1
        log(f"failed: {exc!r}")
        while True:
            time.sleep(3600)
