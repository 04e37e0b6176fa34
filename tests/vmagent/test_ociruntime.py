"""The agent's OCI runtime plumbing without a VM: which runtime runs, how its errors map to
gRPC statuses (runc's and crun's wording), when the fixed-addresses launcher is used, and the
delete done without a runtime process. vmexec's fixed-addresses: tests/vmagent/test_vmexec.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from grpclib.const import Status

from vmagent import containers, ociruntime
from vmagent.ociruntime import _status_for, runtime_binary


def _executable(path: Path) -> str:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_auto_prefers_crun_then_runc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    crun, runc = _executable(tmp_path / "crun"), _executable(tmp_path / "runc")
    monkeypatch.setattr(ociruntime, "CANDIDATES", {"crun": (crun,), "runc": (runc,)})
    assert runtime_binary() == runtime_binary("auto") == crun
    assert runtime_binary("runc") == runc
    assert runtime_binary("/opt/x/crun") == "/opt/x/crun"
    os.unlink(crun)
    assert runtime_binary("auto") == runc
    os.unlink(runc)
    assert runtime_binary("auto") == "runc"  # left to PATH: the error then names it


@pytest.mark.parametrize(("detail", "status"), [
    ("container does not exist", Status.NOT_FOUND),  # runc
    ("error opening file `/run/runc/c1/status`: No such file or directory", Status.NOT_FOUND),
    ("container not running", Status.FAILED_PRECONDITION),  # runc
    ("container `c1` is not in created state", Status.FAILED_PRECONDITION),  # crun
    ("container with id exists: c1", Status.INTERNAL),
    ("open /nonexistent: no such file or directory", Status.INTERNAL),
])
def test_runtime_messages_map_to_statuses(detail: str, status: Status) -> None:
    assert _status_for(detail) == status


def test_launcher_only_for_crun_with_vmexec(tmp_path: Path) -> None:
    vmexec = _executable(tmp_path / "vmexec")
    assert containers.fixed_addresses_launcher("crun", vmexec) == (
        vmexec, "fixed-addresses", "--")
    # runc 1.1 ignores linux.personality: its containers would keep the launcher's.
    assert containers.fixed_addresses_launcher("runc", vmexec) == ()
    assert containers.fixed_addresses_launcher("crun", str(tmp_path / "missing")) == ()


def test_release_exited_removes_the_cgroup_then_the_state(tmp_path: Path) -> None:
    cgroup, state = tmp_path / "cg", tmp_path / "state" / "c1"
    cgroup.mkdir()
    state.mkdir(parents=True)
    (state / "status").write_text("stopped")
    assert containers.release_exited(str(cgroup), str(state))
    assert not cgroup.exists() and not state.exists()
    # Gone already (a second delete, or a cgroup the runtime never made) is released too.
    assert containers.release_exited(str(cgroup), str(tmp_path / "state" / "c2"))


def test_release_exited_leaves_a_busy_cgroup_to_the_runtime(tmp_path: Path) -> None:
    cgroup, state = tmp_path / "cg", tmp_path / "state"
    (cgroup / "child").mkdir(parents=True)  # rmdir fails, as on a populated cgroup (EBUSY)
    state.mkdir()
    assert not containers.release_exited(str(cgroup), str(state))
    assert cgroup.exists() and state.exists()
    assert not containers.release_exited("", str(state))
