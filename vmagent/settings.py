"""Agent settings: defaults, then `criserver.<key>=<value>` words of the kernel command line,
then `--<key>=<value>` arguments (tests and manual runs on the host use the latter).
A plain class, not a dataclass: `dataclasses` is one more import before the first answer.
"""

from __future__ import annotations

import os

from vmagent.contract import AGENT_PORT_NAME, AGENT_VSOCK_PORT, CMDLINE_PREFIX, RUN_DIR

# name -> (type, default)
_FIELDS: dict[str, tuple[type, object]] = {
    # "auto" (vsock if the guest has /dev/vsock, else virtio-serial), "serial", "vsock",
    # "fd:<n>" (an inherited fd that behaves like a virtio-serial port) or "unix:<path>".
    "transport": (str, "auto"),
    "port_name": (str, AGENT_PORT_NAME),
    "vsock_port": (int, AGENT_VSOCK_PORT),
    # Where the agent keeps pod files (resolv.conf, hosts) that containers bind-mount later.
    "run_dir": (str, RUN_DIR),
    "log_level": (str, "info"),
    # Re-check the port's connection state this often while no host is connected, in case a
    # SIGIO was missed (the signal is the normal wake-up; this is only a safety net).
    "poll_interval": (float, 1.0),
    # Power the VM off with reboot(2) on Shutdown or a fatal error, instead of exiting.
    # Defaults to on for PID 1 or when the kernel command line carries criserver.* words.
    "power_off": (bool, False),
    # ExecSync in containers: "auto" (the agent's vmexec path when the spec allows it,
    # else the OCI runtime's exec) or "runtime" (always the runtime's exec).
    "exec_mode": (str, "auto"),
    # The OCI runtime that runs containers: "auto" (crun when the guest has it, else runc),
    # "crun", "runc" or a path.
    "oci_runtime": (str, "auto"),
    # Run crun without address randomisation (the host asks for it under TCG, where code placed
    # anew by every exec is translated anew: crun start took 0.43 s instead of 0.08 s). The
    # containers' processes keep theirs (guest/vmexec.c fixed-addresses).
    "runtime_fixed_addresses": (bool, False),
    # The fast path's helper binary (guest/vmexec.c; "": where the guest image puts it).
    # Without it every exec goes through runc.
    "vmexec": (str, ""),
    # This guest is booted to become a template (criserver/vm/template.py): it loads what
    # every pod's first container needs before it answers, and keeps its page cache, since
    # clones share both with it until they write them.
    "template": (bool, False),
}


class Settings:
    transport: str
    port_name: str
    vsock_port: int
    run_dir: str
    log_level: str
    poll_interval: float
    power_off: bool
    exec_mode: str
    oci_runtime: str
    runtime_fixed_addresses: bool
    vmexec: str
    template: bool

    def __init__(self, **values: object) -> None:
        for name, (_, default) in _FIELDS.items():
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"unknown settings {sorted(values)}")

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS)
        return f"Settings({inner})"


def _convert(name: str, raw: str) -> object:
    kind = _FIELDS[name][0]
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return kind(raw)


def _pairs(words: list[str], prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for word in words:
        if not word.startswith(prefix) or "=" not in word:
            continue
        key, _, raw = word[len(prefix) :].partition("=")
        key = key.replace("-", "_")
        if key in _FIELDS:
            out[key] = _convert(key, raw)
    return out


def load(argv: list[str], cmdline_path: str = "/proc/cmdline") -> Settings:
    """Build the settings; unknown keys are ignored so an older agent boots a newer host's VM."""
    try:
        with open(cmdline_path) as f:  # procfs: memory-backed, no blocking I/O
            words = f.read().split()
    except OSError:
        words = []
    values = _pairs(words, CMDLINE_PREFIX)
    # A kernel command line that mentions criserver means we are the agent of a VM.
    values.setdefault("power_off", os.getpid() == 1 or bool(values))
    values.update(_pairs(argv, "--"))
    return Settings(**values)
