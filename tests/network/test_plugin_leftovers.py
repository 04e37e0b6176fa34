"""CNI plugins a killed daemon left running: the next daemon's first DEL runs after them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from criserver import files
from criserver.config import NetworkConfig
from criserver.network import plugin_leftovers
from criserver.network.cni import CniManager

# Records each command; ADD takes ADD_SECONDS, as a plugin in the middle of its work would.
PLUGIN = """#!/bin/sh
cat > /dev/null
case "$CNI_COMMAND" in
ADD) sleep "${{ADD_SECONDS:-0}}"; echo ADD >> {log}; echo '{{"cniVersion": "1.0.0"}}' ;;
DEL) echo DEL >> {log} ;;
esac
"""


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[CniManager, Path, Path]]:
    """A CniManager whose cached pod "pod1" uses the recording plugin; the plugin; its log."""
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir()
    plugin = bindir / "recorder"
    plugin.write_text(PLUGIN.format(log=log))
    plugin.chmod(0o755)
    cache_dir = tmp_path / "cache"
    conf = {"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "recorder"}]}
    entry = {"kind": "criserver-cni-cache", "containerId": "pod1", "ifName": "eth0",
             "cniArgs": "", "runtimeConfig": {},
             "networks": [{"config": conf, "ifName": "eth0", "result": None}]}
    files.write_atomic(cache_dir / "results" / "pod1.json", json.dumps(entry))
    cni = CniManager(NetworkConfig(cni_bin_dirs=[str(bindir)], cni_conf_dir=str(tmp_path)),
                     cache_dir, plugin_timeout=2.0)
    yield cni, plugin, log


@contextlib.contextmanager
def left_running(plugin: Path, owner: Path, add_seconds: float
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """The plugin as a dead daemon's ADD left it: running, with that daemon's marker."""
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "ADD", "ADD_SECONDS": str(add_seconds),
           **plugin_leftovers.owner_env(owner)}
    proc = subprocess.Popen([str(plugin)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        # The kernel sets up /proc/<pid>/environ a little after Popen returns.
        deadline = time.monotonic() + 5
        while proc.pid not in plugin_leftovers.find(owner):
            assert time.monotonic() < deadline, "the plugin never showed its marker"
            time.sleep(0.001)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the plugin's sleep too
        proc.wait()


async def test_del_waits_for_an_add_the_previous_daemon_left_running(
        cache: tuple[CniManager, Path, Path]) -> None:
    cni, plugin, log = cache
    with left_running(plugin, cni._cache_dir, add_seconds=0.5) as left:
        await cni.delete("pod1", None)
        assert left.wait(5) == 0  # finished by itself, not killed
    assert log.read_text().split() == ["ADD", "DEL"]  # nothing the late ADD made outlives DEL


async def test_a_hung_leftover_is_killed_after_the_plugin_timeout(
        cache: tuple[CniManager, Path, Path]) -> None:
    cni, plugin, log = cache
    with left_running(plugin, cni._cache_dir, add_seconds=60) as hung:
        await cni.delete("pod1", None)
        assert hung.wait(5) == -signal.SIGKILL
    assert log.read_text().split() == ["DEL"]


async def test_other_owners_plugins_are_left_alone(
        cache: tuple[CniManager, Path, Path], tmp_path: Path) -> None:
    cni, plugin, log = cache
    with left_running(plugin, tmp_path / "another-runtime", add_seconds=60) as other:
        assert other.pid in plugin_leftovers.find(tmp_path / "another-runtime")
        await cni.delete("pod1", None)
        assert other.poll() is None
    assert log.read_text().split() == ["DEL"]


async def test_this_daemons_own_plugins_carry_the_marker(
        cache: tuple[CniManager, Path, Path], tmp_path: Path) -> None:
    cni, plugin, _ = cache
    plugin.write_text(f"#!/bin/sh\ncat > /dev/null\nenv > {tmp_path / 'env'}\n")
    await cni.delete("pod1", None)
    env = (tmp_path / "env").read_text().splitlines()
    assert f"{plugin_leftovers.OWNER_ENV}={cni._cache_dir}" in env
