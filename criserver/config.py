"""The daemon's configuration: typed sections with embedded defaults, loaded from TOML.

Every key has a default, so criserver runs with no file at all. Loading rejects unknown keys and
values of the wrong type or range, naming the key, before anything starts.
`criserver config default` renders the defaults (with each field's help text) as TOML.
"""

from __future__ import annotations

import dataclasses
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/criserver/config.toml")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and the help text shown by `criserver config default`."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def option(default: Any, help: str, **kw: Any) -> Any:
    """A field of a backend's options dataclass (validated by `build_options`): its default,
    the help text `criserver config default` prints, and checks (choices, min, max)."""
    return _f(default, help, **kw)


@dataclass(frozen=True)
class DaemonConfig:
    listen: str = _f("unix:///run/criserver/criserver.sock", "CRI endpoint (unix:// only)")
    root: str = _f("/var/lib/criserver", "Persistent state: database, images, pod files")
    state: str = _f("/run/criserver", "Volatile state: sockets, pid files (lost at reboot)")
    log_level: str = _f("info", "debug, info, warning or error",
                        choices=("debug", "info", "warning", "error"))
    log_format: str = _f("text", "text (key=value) or json", choices=("text", "json"))
    shutdown_timeout: float = _f(10.0, "Seconds SIGTERM waits for in-flight calls", min=0)
    cgroup_driver: str = _f("cgroupfs", "Reported to kubelet by RuntimeConfig",
                            choices=("cgroupfs", "systemd"))
    socket_group: str = _f("", "Group owning the socket (mode 0660); empty: root")
    max_message_bytes: int = _f(16 * 1024 * 1024 + 4096, "Largest gRPC message", min=4096)
    trace: bool = _f(False, "Log one `trace rpc=...` line per pod and container lifecycle call "
                            "with the time of each step, the guest agent's included")


@dataclass(frozen=True)
class RuntimeHandlerConfig:
    backend: str = _f("microvm", "Entry point name (group criserver.backends) or module:Class")
    options: dict[str, Any] = _f({}, "Backend-specific options, validated by the backend")


@dataclass(frozen=True)
class RuntimeConfig:
    default_handler: str = _f("microvm", "Handler used when the CRI request names none")
    host_namespaces_handler: str = _f(
        "runc", "Handler for pods that name none and share a node namespace (hostNetwork, "
                "hostPID, hostIPC); empty: the default handler (the micro-VM refuses them). "
                "Left unset, a config without a [runtimes.runc] table gets empty")
    privileged_handler: str = _f(
        "runc", "Handler for pods that name none and are privileged (Bidirectional mount "
                "propagation needs one, and the micro-VM refuses it); empty: the default "
                "handler. Left unset, a config without a [runtimes.runc] table gets empty")


@dataclass(frozen=True)
class ImageConfig:
    insecure_registries: list[str] = _f(
        [], "Registries reached over plain HTTP (loopback always is)"
    )
    mirrors: dict[str, list[str]] = _f({}, 'Per registry, mirror endpoints tried in order: '
                                           '{"docker.io" = ["https://mirror.local"]}')
    max_concurrent_downloads: int = _f(3, "Layers downloaded at once per pull", min=1)
    max_layer_bytes: int = _f(
        8 * 1024**3, "Largest uncompressed layer (decompression bombs)", min=1
    )
    max_layer_entries: int = _f(1_000_000, "Most tar entries in one layer", min=1)
    allow_device_nodes: bool = _f(False, "Unpack device nodes from layers (else skipped)")
    pinned_images: list[str] = _f([], "Images never garbage-collected (reported as pinned)")


@dataclass(frozen=True)
class NetworkConfig:
    cni_bin_dirs: list[str] = _f(["/usr/lib/cni", "/opt/cni/bin"], "Where CNI plugins are found")
    cni_conf_dir: str = _f("/etc/cni/net.d", "CNI network configs (first by name wins)")
    default_subnet: str = _f("10.88.0.0/16", "Pod subnet of the built-in network when kubelet "
                                              "has not set a pod CIDR")
    default_network_name: str = _f("criserver", "CNI network name of the built-in network")
    default_bridge: str = _f("cri0", "Bridge of the built-in network")
    plugin_timeout: float = _f(60.0, "Seconds one CNI plugin call may take", min=1)


@dataclass(frozen=True)
class StreamingConfig:
    address: str = _f("127.0.0.1", "Address of the exec/attach/port-forward server")
    port: int = _f(0, "Port of that server; 0 picks a free one", min=0, max=65535)
    idle_timeout: float = _f(4 * 3600.0, "Seconds a session may stay idle before it is closed",
                             min=1)
    creation_timeout: float = _f(30.0, "Seconds a client has to open a session's streams", min=1)


@dataclass(frozen=True)
class MachineClassConfig:
    name: str = _f("", "Class name, as the machinepoollet asks for it")
    cpu: int = _f(1, "vCPUs (whole cores)", min=1)
    memory_bytes: int = _f(1024**3, "Guest memory in bytes", min=64 * 1024**2)


@dataclass(frozen=True)
class MachineConfig:
    """The IRI MachineRuntime: whole VMs for IronCore (criserver/machine/)."""

    enabled: bool = _f(False, "Serve the IRI MachineRuntime on its own socket")
    listen: str = _f("unix:///var/run/iri-machineprovider.sock",
                     "MachineRuntime endpoint (unix:// only)")
    root: str = _f("", "Machines' persistent files (disks, console logs); empty: "
                       "<daemon.root>/machines")
    state: str = _f("", "Machines' volatile files (QMP and console sockets); empty: "
                        "<daemon.state>/machines")
    classes: list[MachineClassConfig] = _f(
        [MachineClassConfig("small", 1, 1024**3), MachineClassConfig("medium", 2, 4 * 1024**3)],
        "Machine classes offered; Status reports how many of each fit this host")
    delete_grace_seconds: float = _f(300.0, "Seconds a deleted machine gets to shut down after "
                                            "ACPI power button presses before it is killed", min=0)
    max_local_disk_bytes: int = _f(1024**4, "Largest local_disk a machine may ask for", min=1)
    accelerator: str = _f("auto", "auto (KVM when a probe boot proves it works, else TCG), "
                                  "kvm or tcg; shared with pods when their handler says the same",
                          choices=("auto", "kvm", "tcg"))
    qemu_binary: str = _f("qemu-system-x86_64", "QEMU executable, a name on PATH or a path")
    connection_dirs: list[str] = _f(
        ["/var/lib/iri-volumes"],
        "Directories whose files and block devices `connection` volumes (driver \"file\") may "
        "name; nothing outside them is handed to a machine")


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    runtimes: dict[str, RuntimeHandlerConfig] = field(
        default_factory=lambda: {"microvm": RuntimeHandlerConfig(),
                                 "runc": RuntimeHandlerConfig(backend="runc")}
    )
    image: ImageConfig = field(default_factory=ImageConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)

    def handler(self, name: str) -> RuntimeHandlerConfig | None:
        return self.runtimes.get(name or self.runtime.default_handler)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load the config file (None or a missing default path: embedded defaults) plus
    command-line overrides given as {"daemon.listen": value}.

    :raises ConfigError: unreadable file, unknown key, wrong type or value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            if path != DEFAULT_CONFIG_PATH:
                raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    config: Config = _build(Config, data, "")
    config = _without_absent_default_routes(config, data.get("runtime") or {})
    runtime = config.runtime
    for key, handler in (("default_handler", runtime.default_handler),
                         ("host_namespaces_handler", runtime.host_namespaces_handler),
                         ("privileged_handler", runtime.privileged_handler)):
        if (handler or key == "default_handler") and handler not in config.runtimes:
            raise ConfigError(f"runtime.{key}: no [runtimes.{handler}] table")
    _check_machine(config)
    return config


def _check_machine(config: Config) -> None:
    machine = config.machine
    # Checked here, not when the socket opens: by then the CRI socket already serves.
    if not machine.listen.startswith("unix://"):
        raise ConfigError(f"machine.listen: only unix:// endpoints are supported, got "
                          f"{machine.listen!r}")
    if machine.enabled and machine.listen == config.daemon.listen:
        raise ConfigError("machine.listen: must differ from daemon.listen")
    seen = set()
    for i, machine_class in enumerate(machine.classes):
        if not machine_class.name:
            raise ConfigError(f"machine.classes[{i}].name: a class needs a name")
        if machine_class.name in seen:
            raise ConfigError(f"machine.classes[{i}].name: {machine_class.name!r} is defined "
                              f"twice")
        seen.add(machine_class.name)


def _without_absent_default_routes(config: Config, given: dict[str, Any]) -> Config:
    """A routing key left at its embedded default names a handler the embedded runtimes have;
    a config with its own runtimes table and no such handler keeps every pod on its default
    handler (as before the key existed) rather than failing to load."""
    defaults = RuntimeConfig()
    changes = {}
    for f in dataclasses.fields(RuntimeConfig):
        if f.name == "default_handler" or f.name in given:
            continue
        value = getattr(config.runtime, f.name)
        if value == getattr(defaults, f.name) and value and value not in config.runtimes:
            changes[f.name] = ""
    if not changes:
        return config
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, **changes))


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {_join(where, unknown[0])}")
    values = {}
    for name, value in data.items():
        key = _join(where, name)
        values[name] = _convert(hints[name], value, key, fields[name].metadata)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, meta: Any) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)  # type: ignore[arg-type]
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return {k: _convert(value_type, v, f"{key}.{k}", {}) for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return [_convert(item_type, v, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(hint, type) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def render_default(extra_sections: dict[str, Any] | None = None) -> str:
    """The complete default configuration as commented TOML."""
    lines = ["# criserver configuration: every key below shows its default value.",
             f"# Read from {DEFAULT_CONFIG_PATH} (or --config); all keys are optional.", ""]
    defaults = Config()
    for f in dataclasses.fields(Config):
        value = getattr(defaults, f.name)
        if f.name == "runtimes":
            for handler, handler_config in value.items():
                lines.append("# A runtime handler, named by the CRI request's runtime_handler.")
                lines += _render_table(f"runtimes.{handler}", handler_config)
                options = (extra_sections or {}).get(handler_config.backend)
                if options is not None:
                    lines += _render_table(f"runtimes.{handler}.options", options)
            continue
        lines += _render_table(f.name, value)
    return "\n".join(lines).rstrip() + "\n"


def _render_table(name: str, obj: Any) -> list[str]:
    lines = [f"[{name}]"]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "options" and isinstance(value, dict):
            continue
        if f.metadata.get("help"):
            lines += [f"# {line}" for line in textwrap.wrap(
                f.metadata["help"], 96, break_on_hyphens=False, break_long_words=False)]
        lines.append(f"{f.name} = {_toml_value(value)}")
    lines.append("")
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _toml_value(dataclasses.asdict(value))
    raise TypeError(f"cannot render {value!r} as TOML")


def build_options(cls: type, data: dict[str, Any], where: str) -> Any:
    """Validate a backend's options table against its dataclass (used by backends)."""
    return _build(cls, data, where)

