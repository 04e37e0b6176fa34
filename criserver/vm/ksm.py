"""The host's kernel samepage merging (KSM). QEMU marks guest RAM mergeable (mem-merge is on by
default), so with KSM running, pages that are identical across pods' VMs (kernel text and data,
the agent's files in page cache) are stored once: about 80 MiB less per idle pod here. KSM is a
host-wide setting: the daemon turns it on only when configured to (`ksm = true`).
"""

from __future__ import annotations

from pathlib import Path

KSM_RUN = Path("/sys/kernel/mm/ksm/run")
_STATES = {"0": "off", "1": "on", "2": "off (unmerging)"}


def state(run_file: Path | None = None) -> str:
    """"on", "off", "off (unmerging)" or "unavailable: <why>" (sysfs: no blocking I/O)."""
    try:
        raw = (run_file or KSM_RUN).read_text().strip()
    except OSError as exc:
        return f"unavailable: {exc.strerror}"
    return _STATES.get(raw, f"unknown ({raw})")


def enable(run_file: Path | None = None) -> str:
    """Turn KSM on; returns the state before. Raises OSError when it cannot be changed."""
    before = state(run_file)
    if before != "on":
        (run_file or KSM_RUN).write_text("1\n")
    return before
