"""`criserver check`: the lines it prints for host prerequisites."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver import check
from criserver.backends.microvm.backend import MicroVMOptions
from criserver.config import Config, DaemonConfig

MOUNTS = """\
/dev/vda / ext4 rw 0 0
tmpfs /run tmpfs rw 0 0
/dev/vdb /run/big\\040disk ext4 rw 0 0
tmpfs /srv ext4 rw 0 0
tmpfs /srv tmpfs rw 0 0
"""


def test_filesystem_of_finds_the_innermost_mount() -> None:
    assert check.filesystem_of(Path("/var/lib/x"), MOUNTS) == ("/", "ext4")
    assert check.filesystem_of(Path("/run/criserver/templates"), MOUNTS) == ("/run", "tmpfs")
    assert check.filesystem_of(Path("/run/big disk/t"), MOUNTS) == ("/run/big disk", "ext4")
    assert check.filesystem_of(Path("/run/bigger"), MOUNTS) == ("/run", "tmpfs")
    assert check.filesystem_of(Path("/srv/t"), MOUNTS) == ("/srv", "tmpfs")  # the top mount


def test_templates_dir_not_on_tmpfs_is_a_warning_with_the_fix(tmp_path: Path) -> None:
    if check.filesystem_of(tmp_path)[1] == "tmpfs":
        pytest.skip("the test's temporary directory is on a tmpfs here")
    config = Config(daemon=DaemonConfig(state=str(tmp_path / "state")))
    result = check.check_templates_dir(config, MicroVMOptions())
    assert not result.ok and not result.required
    assert str(tmp_path / "state" / "runtimes" / "microvm" / "templates") in result.detail
    assert "tmpfs" in result.fix and "templates_dir" in result.fix
    assert check.check_templates_dir(config, MicroVMOptions(templates=False)).ok


@pytest.mark.skipif(check.filesystem_of(Path("/dev/shm"))[1] != "tmpfs",
                    reason="no tmpfs at /dev/shm")
def test_templates_dir_on_tmpfs_passes() -> None:
    options = MicroVMOptions(templates_dir="/dev/shm/criserver-t")
    result = check.check_templates_dir(Config(), options)
    assert result.ok and "/dev/shm" in result.detail


def test_run_checks_prints_the_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if check.filesystem_of(tmp_path)[1] == "tmpfs":
        pytest.skip("the test's temporary directory is on a tmpfs here")
    # Not the probe boot: only the templates line is looked at.
    monkeypatch.setattr(check, "check_accelerator",
                        lambda *a: check.Result("accelerator", True, ""))
    check.run_checks(Config(daemon=DaemonConfig(state=str(tmp_path))))
    lines = capsys.readouterr().out.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("[warn] templates dir:")]
    assert lines[at + 1].strip().startswith("fix: mkdir -p ") and "mount -t tmpfs" in lines[at + 1]
