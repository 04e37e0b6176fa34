"""Machine classes: capabilities as the poollet matches them, quantities as the host allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.config import ConfigError, MachineClassConfig, load
from criserver.machine.classes import HostCapacity, MachineClasses, host_capacity
from criserver.machine.driver import Shape

GIB = 1024**3


def test_status_lists_each_class_with_its_quantity() -> None:
    classes = MachineClasses([MachineClassConfig("small", 1, 1 * GIB),
                              MachineClassConfig("big", 4, 16 * GIB)])
    status = classes.status(HostCapacity(cores=8, memory_bytes=20 * GIB))
    assert [(s.machine_class.name, s.quantity) for s in status] == [("small", 8), ("big", 1)]
    assert dict(status[1].machine_class.capabilities.resources) == {
        "cpu": 4, "memory": 16 * GIB}


def test_quantity_is_the_smaller_of_cores_and_memory() -> None:
    classes = MachineClasses([MachineClassConfig("c", 2, 3 * GIB)])
    (memory_bound,) = classes.status(HostCapacity(cores=64, memory_bytes=10 * GIB))
    (cpu_bound,) = classes.status(HostCapacity(cores=5, memory_bytes=100 * GIB))
    (none,) = classes.status(HostCapacity(cores=1, memory_bytes=100 * GIB))
    assert (memory_bound.quantity, cpu_bound.quantity, none.quantity) == (3, 2, 0)


def test_a_class_gives_the_vm_its_shape() -> None:
    classes = MachineClasses([MachineClassConfig("c", 2, 3 * GIB)])
    assert classes.shape("c") == Shape(vcpus=2, memory_mib=3072)
    assert classes.shape("nope") is None


def test_the_host_is_measured() -> None:
    host = host_capacity()
    assert host.cores >= 1 and host.memory_bytes > 64 * 1024**2


def test_the_default_config_offers_classes() -> None:
    config = load(None)
    assert config.machine.enabled is False
    assert [c.name for c in config.machine.classes] == ["small", "medium"]


@pytest.mark.parametrize(("table", "error"), [
    ('classes = [{name = "a", cpu = 0}]', "machine.classes[0].cpu: 0 is below the minimum 1"),
    ('classes = [{name = "a", memory_bytes = 1}]', "machine.classes[0].memory_bytes"),
    ('classes = [{cpu = 1}]', "machine.classes[0].name: a class needs a name"),
    ('classes = [{name = "a"}, {name = "a"}]', "machine.classes[1].name: 'a' is defined twice"),
    ('classes = [{name = "a", memory = 1}]', "unknown key machine.classes[0].memory"),
    ('classes = "small"', "machine.classes: expected a list"),
    ('listen = "/run/iri.sock"', "machine.listen: only unix:// endpoints are supported"),
    ('enabled = true\nlisten = "unix:///run/criserver/criserver.sock"',
     "machine.listen: must differ from daemon.listen"),
])
def test_bad_machine_tables_are_config_errors(tmp_path: Path, table: str, error: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[machine]\n{table}\n")
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load(path)


def test_classes_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[machine]\nenabled = true\n'
                    'classes = [{name = "x2", cpu = 2, memory_bytes = 2147483648}]\n')
    config = load(path)
    assert config.machine.classes == [MachineClassConfig("x2", 2, 2 * GIB)]
