"""Stand-in agent: write a hello line to the `criserver.agent` port, then echo what arrives.

Blocking I/O on purpose: it is a single-purpose process that must start fast.
"""

import glob
import os
import select
import time

PORT_NAME = "criserver.agent"
HELLO = b"CRISERVER_STANDIN_AGENT_READY\n"


def find_port() -> str:
    # Without udev the port is /dev/vportNpM with N varying: match it by name in sysfs.
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as f:
            if f.read().strip() == PORT_NAME:
                return "/dev/" + name_file.split("/")[-2]
    raise SystemExit(f"stand-in agent: no virtio port named {PORT_NAME}")


def main() -> None:
    print("stand-in agent: started", flush=True)
    fd = os.open(find_port(), os.O_RDWR)
    # Bytes written while no host is connected are dropped: wait for the host end first
    # (the port reports POLLHUP until then).
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while any(ev & select.POLLHUP for _, ev in poller.poll(1000)):
        time.sleep(0.02)
    os.write(fd, HELLO)
    while True:
        data = os.read(fd, 4096)
        if not data:  # no host connected: read() returns b"" at once, so back off
            time.sleep(0.05)
            continue
        os.write(fd, data)


main()
