"""The real daemon's MachineRuntime driven only by irictl-machine, IronCore's own command-line
client (built by `make irictl` from tools/irictl/go.mod): what its YAML decoding, table and JSON
rendering, filters and exit codes make of our answers. One test keeps its machine off (no VM);
the other boots one and types into its console through `irictl-machine exec`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from criserver import __version__
from criserver.api.iri.machine.v1alpha1 import api_pb2 as iri
from criserver.machine import network
from tests.conformance.tools import REPO, built
from tests.daemon import INERT_CONFIG, Daemon
from tests.machine import os_image
from tests.machine.console import ESCAPES, Console
from tests.machine.test_daemon_machines import wait_for
from tests.machine.test_os_image import files, push  # noqa: F401 - a fixture
from tests.registry import Registry
from tests.vm.conftest import vm_dir  # noqa: F401 - a fixture: short path, no QEMU left

MiB = 1 << 20
# irictl decodes YAML with encoding/json into the generated Go structs: snake_case field names,
# enums as their numbers.
POWER_ON, POWER_OFF = 0, 1
# What the machinepoollet labels a machine with; irictl's event table shows them.
NAME_LABEL = "machinepoollet.ironcore.dev/machine-name"
NAMESPACE_LABEL = "machinepoollet.ironcore.dev/machine-namespace"
IGNITION = b'{"ignition": {"version": "3.4.0"}}'


def irictl_version() -> str:
    """The ironcore version tools/irictl/go.mod pins (one source of it)."""
    found = re.search(r"^\s*github\.com/ironcore-dev/ironcore (v\S+)",
                      (REPO / "tools/irictl/go.mod").read_text(), re.M)
    assert found, "tools/irictl/go.mod requires no github.com/ironcore-dev/ironcore"
    return found[1]


@pytest.fixture(scope="module")
def binary() -> Path:
    return built(REPO / ".tools" / f"irictl-{irictl_version()}" / "irictl-machine", "irictl")


@dataclass
class Irictl:
    binary: Path
    socket: Path
    home: Path  # empty: no ~/.irictl-machine/config of the host reshapes the tables

    def env(self) -> dict[str, str]:
        # The endpoint as a machinepoollet's host has it; Exec's URL is on loopback, no proxy.
        return {"PATH": os.environ.get("PATH", ""), "HOME": str(self.home),
                "IRI_MACHINE_RUNTIME_ENDPOINT": f"unix://{self.socket}", "NO_PROXY": "*"}

    def run(self, *args: str, stdin: str | None = None, ok: bool = True
            ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.binary), *args], input=stdin, capture_output=True,
                              text=True, env=self.env(), timeout=60, start_new_session=True)
        if ok:
            assert done.returncode == 0, f"irictl-machine {' '.join(args)}: {done.stderr}"
        return done

    def machines(self, *args: str) -> list[dict[str, Any]]:
        """`get machine ... -o json` (null when nothing matched)."""
        return json.loads(self.run("get", "machine", *args, "-o", "json").stdout) or []

    def machine(self, machine_id: str) -> dict[str, Any] | None:
        found = self.machines(machine_id)
        assert len(found) <= 1, found
        return found[0] if found else None

    def create(self, path: Path) -> str:
        out = self.run("create", "machine", "-f", str(path)).stdout
        found = re.fullmatch(r"Created machine ([0-9a-f]{63})\n", out)
        assert found, out
        return found[1]

    def reasons(self, **labels: str) -> list[str]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        events = json.loads(self.run("get", "events", "-l", selector, "-o", "json").stdout)
        return [e["spec"]["reason"] for e in events or []]

    async def wait(self, machine_id: str, state: int | None, timeout: float = 30
                   ) -> dict[str, Any] | None:
        """The machine once it is in `state` with its generation observed (None: once gone)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            machine = self.machine(machine_id)
            if state is None and machine is None:
                return None
            if machine is not None and machine["status"].get("state", 0) == state and \
                    machine["status"].get("observed_generation") == \
                    machine["metadata"]["generation"]:
                return machine
            assert asyncio.get_running_loop().time() < deadline, \
                f"machine {machine_id} not {state} after {timeout}s: {machine}"
            await asyncio.sleep(0.2)


async def wait_for_prompt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          timeout: float = 90) -> None:
    """Until the guest's shell prompts: a machine is RUNNING before its shell reads (what is
    typed during the boot is partly lost), so press enter until it answers."""
    prompted = re.compile(r"# *$")
    seen = ""
    async with asyncio.timeout(timeout):
        while not prompted.search(ESCAPES.sub("", seen)):
            writer.write(b"\n")
            await writer.drain()
            try:
                async with asyncio.timeout(2):
                    while not prompted.search(ESCAPES.sub("", seen)):
                        data = await reader.read(4096)
                        assert data, f"the console closed: {seen[-500:]!r}"
                        seen += data.decode(errors="replace")
            except TimeoutError:
                pass


def daemon_config(sock: Path, state: Path) -> str:
    return INERT_CONFIG + (
        f'[machine]\nenabled = true\nlisten = "unix://{sock}"\nstate = "{state}"\n'
        'delete_grace_seconds = 30\n'
        'classes = [{name = "t1", cpu = 1, memory_bytes = 268435456}]\n')


@pytest.fixture
def irictl(tmp_path: Path, vm_dir: Path, binary: Path) -> Iterator[Irictl]:  # noqa: F811
    sock = tmp_path / "iri-machine.sock"
    (tmp_path / "home").mkdir()
    daemon = Daemon(tmp_path, daemon_config(sock, vm_dir)).start()
    try:
        wait_for(sock, daemon)
        yield Irictl(binary, sock, tmp_path / "home")
    finally:
        daemon.kill()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def machine_yaml(power: int, image: str = "", uid: str = "cli") -> str:
    image_line = f"\n        image:\n          image: {image}" if image else ""
    return f"""\
metadata:
  id: ignored-by-the-server
  labels:
    uid: {uid}
    {NAME_LABEL}: web-0
    {NAMESPACE_LABEL}: shop
spec:
  class: t1
  power: {power}
  ignition_data: {base64.b64encode(IGNITION).decode()}
  volumes:
    - name: root
      device: oda
      local_disk:
        size_bytes: {64 * MiB}{image_line}
  network_interfaces:
    - name: eth0
      network_id: net-a
"""


async def test_a_machine_that_stays_off(irictl: Irictl, tmp_path: Path) -> None:
    """Every irictl command but a working exec, on a machine that never boots."""
    version = irictl.run("get", "version").stdout.split()
    assert version == ["Name", "Version", "criserver", __version__]
    (t1,) = json.loads(irictl.run("get", "status", "-o", "json").stdout)
    assert t1["machine_class"] == {"name": "t1", "capabilities": {
        "resources": {"cpu": 1, "memory": 256 * MiB}}}
    assert t1["quantity"] >= 1
    assert irictl.run("get", "status").stdout.split()[4:7] == ["t1", "1", str(256 * MiB)]
    assert irictl.machines() == []

    m = irictl.create(write(tmp_path / "machine.yaml", machine_yaml(POWER_OFF)))
    stopped = await irictl.wait(m, iri.MACHINE_STOPPED)
    assert stopped is not None
    assert stopped["metadata"]["labels"] == {"uid": "cli", NAME_LABEL: "web-0",
                                             NAMESPACE_LABEL: "shop"}
    assert stopped["spec"]["power"] == POWER_OFF and stopped["spec"]["class"] == "t1"
    assert base64.b64decode(stopped["spec"]["ignition_data"]) == IGNITION
    # The table: irictl reads created_at as Unix nanoseconds (an age in seconds, not decades).
    (row,) = irictl.run("get", "machine").stdout.splitlines()[1:]
    assert row.split()[:3] == [m, "t1", "MACHINE_STOPPED"]
    assert re.fullmatch(r"\d+s", row.split()[3]), row
    # Filters: an id, exact labels (every pair must match).
    assert [x["metadata"]["id"] for x in irictl.machines("-l", "uid=cli")] == [m]
    assert irictl.machines("-l", "uid=cli,pool=other") == []
    assert irictl.machines("0" * 63) == []

    # Volumes and NICs on an off machine: recorded in the spec, a new generation observed.
    data = write(tmp_path / "data.yaml", f"name: data\ndevice: odb\nlocal_disk:\n"
                                         f"  size_bytes: {16 * MiB}\n")
    assert irictl.run("attach", "volume", "--machine-id", m, "-f", str(data)).stdout == \
        f"Attached volume data to machine {m}\n"
    again = irictl.run("attach", "volume", "--machine-id", m, "-f", str(data), ok=False)
    assert again.returncode == 1 and "code = AlreadyExists" in again.stderr
    bigger = write(tmp_path / "bigger.yaml", f"name: data\ndevice: odb\nlocal_disk:\n"
                                             f"  size_bytes: {32 * MiB}\n")
    irictl.run("update", "volume", "--machine-id", m, "-f", str(bigger))
    nic = write(tmp_path / "nic.yaml", "name: eth1\nnetwork_id: net-b\n")
    assert irictl.run("attach", "nic", "--machine-id", m, "-f", str(nic)).stdout == \
        f"Attached networkinterface eth1 to machine {m}\n"
    again = irictl.run("attach", "nic", "--machine-id", m, "-f", str(nic), ok=False)
    assert again.returncode == 1 and "code = AlreadyExists" in again.stderr
    attached = await irictl.wait(m, iri.MACHINE_STOPPED)
    assert attached is not None and attached["metadata"]["generation"] == 4
    assert [(v["name"], v["local_disk"]["size_bytes"]) for v in attached["spec"]["volumes"]] == \
        [("root", 64 * MiB), ("data", 32 * MiB)]
    assert [n["name"] for n in attached["spec"]["network_interfaces"]] == ["eth0", "eth1"]

    # Detaching reports unknown names and goes on.
    assert irictl.run("detach", "volume", "--machine-id", m, "data", "nope").stdout == (
        f"Detached volume data from machine {m}\nVolume nope in machine {m} not found\n")
    assert irictl.run("detach", "nic", "--machine-id", m, "eth1").stdout == \
        f"Detached network interface eth1 from machine {m}\n"
    missing = irictl.run("update", "volume", "--machine-id", m, "-f", str(bigger), ok=False)
    assert missing.returncode == 1 and "code = NotFound" in missing.stderr
    detached = await irictl.wait(m, iri.MACHINE_STOPPED)
    assert detached is not None
    assert [v["name"] for v in detached["spec"]["volumes"]] == ["root"]
    assert [n["name"] for n in detached["spec"]["network_interfaces"]] == ["eth0"]

    irictl.run("update", "power", "--machine-id", m, "--power", str(POWER_OFF))
    # Bad input: a clear status and a non-zero exit, nothing changed.
    for args, stdin, code in (
        (("update", "power", "--machine-id", m, "--power", "7"), None, "InvalidArgument"),
        (("update", "power", "--machine-id", "nope", "--power", "1"), None, "NotFound"),
        (("attach", "volume", "--machine-id", m, "-f", "-"),
         "name: x\ndevice: sda\nlocal_disk:\n  size_bytes: 1048576\n", "InvalidArgument"),
        (("attach", "nic", "--machine-id", m, "-f", "-"), "name: eth9\n", "InvalidArgument"),
        (("attach", "volume", "--machine-id", "nope", "-f", str(data)), None, "NotFound"),
        (("create", "machine", "-f", "-"), "spec:\n  class: t9\n", "InvalidArgument"),
        (("create", "machine", "-f", "-"), "spec: [", None),
    ):
        refused = irictl.run(*args, stdin=stdin, ok=False)
        assert refused.returncode == 1, (args, refused.stdout)
        if code:
            assert f"code = {code}" in refused.stderr, (args, refused.stderr)
    unchanged = irictl.machines()
    assert [x["metadata"]["id"] for x in unchanged] == [m]
    # (Powering off what is off changes no spec: no new generation either.)
    assert unchanged[0]["metadata"]["generation"] == detached["metadata"]["generation"]
    # No console on a machine that is off: a clear status, not a hang.
    console = irictl.run("exec", m, ok=False)
    assert console.returncode == 1 and "code = Unavailable" in console.stderr

    # Delete reports unknown ids and goes on; the machine leaves the list, an event stays.
    assert irictl.run("delete", "machine", m, "nope").stdout == \
        f"Machine {m} deleted\nMachine nope not found\n"
    await irictl.wait(m, None)
    assert "MachineDeletionSucceeded" in irictl.reasons(uid="cli")
    assert irictl.reasons(uid="other") == []
    # The event table names the object and the poollet's machine it stands for.
    rows = [line.split(None, 4) for line in irictl.run("get", "events").stdout.splitlines()]
    assert rows[0][:3] == ["InvolvedMachineName", "Type", "Reason"]
    deleted = [r for r in rows[1:] if r[2] == "MachineDeletionSucceeded"]
    assert deleted and deleted[0][:2] == [m, "Normal"]
    assert deleted[0][4].split()[-2:] == ["web-0", "shop"]


@pytest.mark.vm
async def test_a_machine_booted_and_typed_into(irictl: Irictl, tmp_path: Path,
                                               registry: Registry,
                                               files: os_image.OsImageFiles,  # noqa: F811
                                               ) -> None:
    """Create from YAML with an OS image, a disk hot-plugged and grown live, the console
    through `irictl-machine exec`, power off, delete."""
    await push(registry, files, "iri/irictl-os", as_index=True)
    image = f"{registry.host}/iri/irictl-os:v1"
    m = irictl.create(write(tmp_path / "machine.yaml", machine_yaml(POWER_ON, image, "vm")))
    running = await irictl.wait(m, iri.MACHINE_RUNNING, timeout=180)
    assert running is not None and running["status"]["image_ref"].startswith(
        f"{registry.host}/iri/irictl-os@sha256:")

    data = write(tmp_path / "data.yaml", f"name: data\ndevice: odb\nlocal_disk:\n"
                                         f"  size_bytes: {16 * MiB}\n")
    bigger = write(tmp_path / "bigger.yaml", f"name: data\ndevice: odb\nlocal_disk:\n"
                                             f"  size_bytes: {32 * MiB}\n")
    irictl.run("attach", "volume", "--machine-id", m, "-f", str(data))
    attached = await irictl.wait(m, iri.MACHINE_RUNNING)
    assert attached is not None
    assert [(v["name"], v.get("handle"), v.get("state")) for v in
            attached["status"]["volumes"]] == [("root", "oda", iri.VOLUME_ATTACHED),
                                               ("data", "odb", iri.VOLUME_ATTACHED)]
    assert [(n["name"], n.get("handle"), n.get("state")) for n in
            attached["status"]["network_interfaces"]] == [
        ("eth0", network.tap_name(m, "eth0"), iri.NETWORK_INTERFACE_ATTACHED)]

    # irictl's exec: SPDY, a terminal, stdin and stdout only; here both are pipes.
    proc = await asyncio.create_subprocess_exec(
        str(irictl.binary), "exec", m, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=irictl.env(), start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await wait_for_prompt(proc.stdout, proc.stdin)
        console = Console.unix(proc.stdout, proc.stdin)
        assert await console.run(f"cat {os_image.IGNITION_PATH}") == IGNITION.decode()
        assert await console.run("cat /sys/class/net/eth0/address") == \
            network.mac_address(m, "eth0")
        await console.until("cat /sys/block/vdb/size", str(16 * MiB // 512))
        irictl.run("update", "volume", "--machine-id", m, "-f", str(bigger))
        await console.until("cat /sys/block/vdb/size", str(32 * MiB // 512))
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    # The end of stdin ends the session at once and frees the machine's one console.
    assert proc.returncode == 0
    irictl.run("exec", m, stdin="")

    irictl.run("update", "power", "--machine-id", m, "--power", str(POWER_OFF))
    await irictl.wait(m, iri.MACHINE_STOPPED, timeout=60)
    assert {"PullingImage", "ImagePullSucceeded", "MachineStarted", "AttachVolumeSucceeded",
            "ResizeVolumeSucceeded", "TriggerShutdownSucceeded"} <= set(irictl.reasons(uid="vm"))
    irictl.run("delete", "machine", m)
    await irictl.wait(m, None, timeout=60)
    assert "MachineDeletionSucceeded" in irictl.reasons(uid="vm")
