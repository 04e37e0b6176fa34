from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("agent_version", "agent_instance_id", "kernel_release", "boot_id", "boot_time_unix_nanos", "uptime_seconds", "agent_started_uptime_seconds", "agent_serving_uptime_seconds", "transport", "connection_serial", "sandbox_ready", "agent_pid")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_TIME_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_STARTED_UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_SERVING_UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_SERIAL_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_READY_FIELD_NUMBER: _ClassVar[int]
    AGENT_PID_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    agent_instance_id: str
    kernel_release: str
    boot_id: str
    boot_time_unix_nanos: int
    uptime_seconds: float
    agent_started_uptime_seconds: float
    agent_serving_uptime_seconds: float
    transport: str
    connection_serial: int
    sandbox_ready: bool
    agent_pid: int
    def __init__(self, agent_version: _Optional[str] = ..., agent_instance_id: _Optional[str] = ..., kernel_release: _Optional[str] = ..., boot_id: _Optional[str] = ..., boot_time_unix_nanos: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., agent_started_uptime_seconds: _Optional[float] = ..., agent_serving_uptime_seconds: _Optional[float] = ..., transport: _Optional[str] = ..., connection_serial: _Optional[int] = ..., sandbox_ready: _Optional[bool] = ..., agent_pid: _Optional[int] = ...) -> None: ...

class SetupSandboxRequest(_message.Message):
    __slots__ = ("request_id", "sandbox_id", "hostname", "resolv_conf", "sysctls", "hosts", "interfaces", "realtime_ns", "entropy")
    class SysctlsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RESOLV_CONF_FIELD_NUMBER: _ClassVar[int]
    SYSCTLS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    REALTIME_NS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sandbox_id: str
    hostname: str
    resolv_conf: str
    sysctls: _containers.ScalarMap[str, str]
    hosts: str
    interfaces: _containers.RepeatedCompositeFieldContainer[Interface]
    realtime_ns: int
    entropy: bytes
    def __init__(self, request_id: _Optional[str] = ..., sandbox_id: _Optional[str] = ..., hostname: _Optional[str] = ..., resolv_conf: _Optional[str] = ..., sysctls: _Optional[_Mapping[str, str]] = ..., hosts: _Optional[str] = ..., interfaces: _Optional[_Iterable[_Union[Interface, _Mapping]]] = ..., realtime_ns: _Optional[int] = ..., entropy: _Optional[bytes] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ("name", "mac", "mtu", "addresses", "routes", "device_mac")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAC_FIELD_NUMBER: _ClassVar[int]
    name: str
    mac: str
    mtu: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    device_mac: str
    def __init__(self, name: _Optional[str] = ..., mac: _Optional[str] = ..., mtu: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., device_mac: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "gateway")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ...) -> None: ...

class SetupSandboxResponse(_message.Message):
    __slots__ = ("hostname", "resolv_conf_path", "hosts_path", "applied_sysctls")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RESOLV_CONF_PATH_FIELD_NUMBER: _ClassVar[int]
    HOSTS_PATH_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SYSCTLS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    resolv_conf_path: str
    hosts_path: str
    applied_sysctls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hostname: _Optional[str] = ..., resolv_conf_path: _Optional[str] = ..., hosts_path: _Optional[str] = ..., applied_sysctls: _Optional[_Iterable[str]] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("action",)
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        POWEROFF: _ClassVar[ShutdownRequest.Action]
        REBOOT: _ClassVar[ShutdownRequest.Action]
    POWEROFF: ShutdownRequest.Action
    REBOOT: ShutdownRequest.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: ShutdownRequest.Action
    def __init__(self, action: _Optional[_Union[ShutdownRequest.Action, str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("container_ids", "details")
    CONTAINER_IDS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    container_ids: _containers.RepeatedScalarFieldContainer[str]
    details: bool
    def __init__(self, container_ids: _Optional[_Iterable[str]] = ..., details: _Optional[bool] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("guest", "containers", "interfaces")
    GUEST_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    guest: GuestStats
    containers: _containers.RepeatedCompositeFieldContainer[ContainerStats]
    interfaces: _containers.RepeatedCompositeFieldContainer[InterfaceStats]
    def __init__(self, guest: _Optional[_Union[GuestStats, _Mapping]] = ..., containers: _Optional[_Iterable[_Union[ContainerStats, _Mapping]]] = ..., interfaces: _Optional[_Iterable[_Union[InterfaceStats, _Mapping]]] = ...) -> None: ...

class InterfaceStats(_message.Message):
    __slots__ = ("name", "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    RX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    RX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    RX_DROPPED_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    TX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TX_DROPPED_FIELD_NUMBER: _ClassVar[int]
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int
    def __init__(self, name: _Optional[str] = ..., rx_bytes: _Optional[int] = ..., rx_packets: _Optional[int] = ..., rx_errors: _Optional[int] = ..., rx_dropped: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., tx_packets: _Optional[int] = ..., tx_errors: _Optional[int] = ..., tx_dropped: _Optional[int] = ...) -> None: ...

class GuestStats(_message.Message):
    __slots__ = ("timestamp_unix_nanos", "memory_total_bytes", "memory_available_bytes", "cpu_usage_nanos", "load1", "processes")
    TIMESTAMP_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_NANOS_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    timestamp_unix_nanos: int
    memory_total_bytes: int
    memory_available_bytes: int
    cpu_usage_nanos: int
    load1: float
    processes: int
    def __init__(self, timestamp_unix_nanos: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., cpu_usage_nanos: _Optional[int] = ..., load1: _Optional[float] = ..., processes: _Optional[int] = ...) -> None: ...

class ContainerStats(_message.Message):
    __slots__ = ("container_id", "timestamp_unix_nanos", "cpu_usage_nanos", "memory_usage_bytes", "memory_working_set_bytes", "memory_rss_bytes", "pids", "writable_layer_bytes", "details")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_NANOS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timestamp_unix_nanos: int
    cpu_usage_nanos: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    memory_rss_bytes: int
    pids: int
    writable_layer_bytes: int
    details: ContainerDetails
    def __init__(self, container_id: _Optional[str] = ..., timestamp_unix_nanos: _Optional[int] = ..., cpu_usage_nanos: _Optional[int] = ..., memory_usage_bytes: _Optional[int] = ..., memory_working_set_bytes: _Optional[int] = ..., memory_rss_bytes: _Optional[int] = ..., pids: _Optional[int] = ..., writable_layer_bytes: _Optional[int] = ..., details: _Optional[_Union[ContainerDetails, _Mapping]] = ...) -> None: ...

class ContainerDetails(_message.Message):
    __slots__ = ("cpu_user_nanos", "cpu_system_nanos", "cpu_periods", "cpu_throttled_periods", "cpu_throttled_nanos", "memory_cache_bytes", "memory_kernel_bytes", "memory_mapped_file_bytes", "memory_swap_bytes", "memory_max_usage_bytes", "memory_failcnt", "memory_pgfault", "memory_pgmajfault", "oom_events", "processes", "threads", "threads_max", "file_descriptors", "sockets", "fs_device", "fs_limit_bytes", "fs_inodes_total", "fs_inodes_free", "io", "spec_cpu_period", "spec_cpu_quota", "spec_cpu_shares", "spec_memory_limit_bytes", "spec_memory_reservation_bytes", "spec_memory_swap_limit_bytes")
    CPU_USER_NANOS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_NANOS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERIODS_FIELD_NUMBER: _ClassVar[int]
    CPU_THROTTLED_PERIODS_FIELD_NUMBER: _ClassVar[int]
    CPU_THROTTLED_NANOS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_KERNEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAPPED_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FAILCNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PGFAULT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PGMAJFAULT_FIELD_NUMBER: _ClassVar[int]
    OOM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    THREADS_MAX_FIELD_NUMBER: _ClassVar[int]
    FILE_DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    SOCKETS_FIELD_NUMBER: _ClassVar[int]
    FS_DEVICE_FIELD_NUMBER: _ClassVar[int]
    FS_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FS_INODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FS_INODES_FREE_FIELD_NUMBER: _ClassVar[int]
    IO_FIELD_NUMBER: _ClassVar[int]
    SPEC_CPU_PERIOD_FIELD_NUMBER: _ClassVar[int]
    SPEC_CPU_QUOTA_FIELD_NUMBER: _ClassVar[int]
    SPEC_CPU_SHARES_FIELD_NUMBER: _ClassVar[int]
    SPEC_MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEC_MEMORY_RESERVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEC_MEMORY_SWAP_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_user_nanos: int
    cpu_system_nanos: int
    cpu_periods: int
    cpu_throttled_periods: int
    cpu_throttled_nanos: int
    memory_cache_bytes: int
    memory_kernel_bytes: int
    memory_mapped_file_bytes: int
    memory_swap_bytes: int
    memory_max_usage_bytes: int
    memory_failcnt: int
    memory_pgfault: int
    memory_pgmajfault: int
    oom_events: int
    processes: int
    threads: int
    threads_max: int
    file_descriptors: int
    sockets: int
    fs_device: str
    fs_limit_bytes: int
    fs_inodes_total: int
    fs_inodes_free: int
    io: _containers.RepeatedCompositeFieldContainer[BlockIo]
    spec_cpu_period: int
    spec_cpu_quota: int
    spec_cpu_shares: int
    spec_memory_limit_bytes: int
    spec_memory_reservation_bytes: int
    spec_memory_swap_limit_bytes: int
    def __init__(self, cpu_user_nanos: _Optional[int] = ..., cpu_system_nanos: _Optional[int] = ..., cpu_periods: _Optional[int] = ..., cpu_throttled_periods: _Optional[int] = ..., cpu_throttled_nanos: _Optional[int] = ..., memory_cache_bytes: _Optional[int] = ..., memory_kernel_bytes: _Optional[int] = ..., memory_mapped_file_bytes: _Optional[int] = ..., memory_swap_bytes: _Optional[int] = ..., memory_max_usage_bytes: _Optional[int] = ..., memory_failcnt: _Optional[int] = ..., memory_pgfault: _Optional[int] = ..., memory_pgmajfault: _Optional[int] = ..., oom_events: _Optional[int] = ..., processes: _Optional[int] = ..., threads: _Optional[int] = ..., threads_max: _Optional[int] = ..., file_descriptors: _Optional[int] = ..., sockets: _Optional[int] = ..., fs_device: _Optional[str] = ..., fs_limit_bytes: _Optional[int] = ..., fs_inodes_total: _Optional[int] = ..., fs_inodes_free: _Optional[int] = ..., io: _Optional[_Iterable[_Union[BlockIo, _Mapping]]] = ..., spec_cpu_period: _Optional[int] = ..., spec_cpu_quota: _Optional[int] = ..., spec_cpu_shares: _Optional[int] = ..., spec_memory_limit_bytes: _Optional[int] = ..., spec_memory_reservation_bytes: _Optional[int] = ..., spec_memory_swap_limit_bytes: _Optional[int] = ...) -> None: ...

class BlockIo(_message.Message):
    __slots__ = ("device", "major", "minor", "read_bytes", "write_bytes", "reads", "writes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    device: str
    major: int
    minor: int
    read_bytes: int
    write_bytes: int
    reads: int
    writes: int
    def __init__(self, device: _Optional[str] = ..., major: _Optional[int] = ..., minor: _Optional[int] = ..., read_bytes: _Optional[int] = ..., write_bytes: _Optional[int] = ..., reads: _Optional[int] = ..., writes: _Optional[int] = ...) -> None: ...

class Mount(_message.Message):
    __slots__ = ("type", "source", "target", "options", "sub_path")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SUB_PATH_FIELD_NUMBER: _ClassVar[int]
    type: str
    source: str
    target: str
    options: _containers.RepeatedScalarFieldContainer[str]
    sub_path: str
    def __init__(self, type: _Optional[str] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ..., sub_path: _Optional[str] = ...) -> None: ...

class Rootfs(_message.Message):
    __slots__ = ("lowers", "upper", "read_only")
    LOWERS_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    lowers: _containers.RepeatedCompositeFieldContainer[Mount]
    upper: Mount
    read_only: bool
    def __init__(self, lowers: _Optional[_Iterable[_Union[Mount, _Mapping]]] = ..., upper: _Optional[_Union[Mount, _Mapping]] = ..., read_only: _Optional[bool] = ...) -> None: ...

class StdioOptions(_message.Message):
    __slots__ = ("tty", "stdin", "stdin_once", "buffer_bytes")
    TTY_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_ONCE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    tty: bool
    stdin: bool
    stdin_once: bool
    buffer_bytes: int
    def __init__(self, tty: _Optional[bool] = ..., stdin: _Optional[bool] = ..., stdin_once: _Optional[bool] = ..., buffer_bytes: _Optional[int] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("request_id", "container_id", "sandbox_id", "oci_spec_json", "rootfs", "stdio", "mounts", "user", "pid_namespace", "strict_supplemental_groups", "outside_pod")
    class PidNamespace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PID_CONTAINER: _ClassVar[CreateContainerRequest.PidNamespace]
        PID_POD: _ClassVar[CreateContainerRequest.PidNamespace]
        PID_GUEST: _ClassVar[CreateContainerRequest.PidNamespace]
    PID_CONTAINER: CreateContainerRequest.PidNamespace
    PID_POD: CreateContainerRequest.PidNamespace
    PID_GUEST: CreateContainerRequest.PidNamespace
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    STDIO_FIELD_NUMBER: _ClassVar[int]
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PID_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    STRICT_SUPPLEMENTAL_GROUPS_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_POD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    container_id: str
    sandbox_id: str
    oci_spec_json: bytes
    rootfs: Rootfs
    stdio: StdioOptions
    mounts: _containers.RepeatedCompositeFieldContainer[Mount]
    user: str
    pid_namespace: CreateContainerRequest.PidNamespace
    strict_supplemental_groups: bool
    outside_pod: bool
    def __init__(self, request_id: _Optional[str] = ..., container_id: _Optional[str] = ..., sandbox_id: _Optional[str] = ..., oci_spec_json: _Optional[bytes] = ..., rootfs: _Optional[_Union[Rootfs, _Mapping]] = ..., stdio: _Optional[_Union[StdioOptions, _Mapping]] = ..., mounts: _Optional[_Iterable[_Union[Mount, _Mapping]]] = ..., user: _Optional[str] = ..., pid_namespace: _Optional[_Union[CreateContainerRequest.PidNamespace, str]] = ..., strict_supplemental_groups: _Optional[bool] = ..., outside_pod: _Optional[bool] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("request_id", "container_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    container_id: str
    def __init__(self, request_id: _Optional[str] = ..., container_id: _Optional[str] = ...) -> None: ...

class SignalContainerRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal", "all")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class WaitContainerRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ExitStatus(_message.Message):
    __slots__ = ("exit_code", "signal", "reason", "finished_at_unix_nanos", "oom_killed")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: int
    reason: str
    finished_at_unix_nanos: int
    oom_killed: bool
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., reason: _Optional[str] = ..., finished_at_unix_nanos: _Optional[int] = ..., oom_killed: _Optional[bool] = ...) -> None: ...

class DeleteContainerRequest(_message.Message):
    __slots__ = ("container_id", "force")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    force: bool
    def __init__(self, container_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ContainerState(_message.Message):
    __slots__ = ("container_id", "status", "pid", "created_at_unix_nanos", "started_at_unix_nanos", "exit", "user")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[ContainerState.Status]
        CREATED: _ClassVar[ContainerState.Status]
        RUNNING: _ClassVar[ContainerState.Status]
        STOPPED: _ClassVar[ContainerState.Status]
    UNKNOWN: ContainerState.Status
    CREATED: ContainerState.Status
    RUNNING: ContainerState.Status
    STOPPED: ContainerState.Status
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    status: ContainerState.Status
    pid: int
    created_at_unix_nanos: int
    started_at_unix_nanos: int
    exit: ExitStatus
    user: User
    def __init__(self, container_id: _Optional[str] = ..., status: _Optional[_Union[ContainerState.Status, str]] = ..., pid: _Optional[int] = ..., created_at_unix_nanos: _Optional[int] = ..., started_at_unix_nanos: _Optional[int] = ..., exit: _Optional[_Union[ExitStatus, _Mapping]] = ..., user: _Optional[_Union[User, _Mapping]] = ...) -> None: ...

class UpdateResourcesRequest(_message.Message):
    __slots__ = ("container_id", "linux_resources_json")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LINUX_RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    linux_resources_json: bytes
    def __init__(self, container_id: _Optional[str] = ..., linux_resources_json: _Optional[bytes] = ...) -> None: ...

class User(_message.Message):
    __slots__ = ("uid", "gid", "additional_gids")
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_GIDS_FIELD_NUMBER: _ClassVar[int]
    uid: int
    gid: int
    additional_gids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, uid: _Optional[int] = ..., gid: _Optional[int] = ..., additional_gids: _Optional[_Iterable[int]] = ...) -> None: ...

class Process(_message.Message):
    __slots__ = ("argv", "env", "cwd", "user", "tty")
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    user: User
    tty: bool
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., tty: _Optional[bool] = ...) -> None: ...

class ExecSyncRequest(_message.Message):
    __slots__ = ("request_id", "container_id", "process", "timeout_seconds", "output_limit_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    container_id: str
    process: Process
    timeout_seconds: float
    output_limit_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., container_id: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., output_limit_bytes: _Optional[int] = ...) -> None: ...

class ExecSyncResponse(_message.Message):
    __slots__ = ("stdout", "stderr", "exit_code", "signal", "timed_out", "stdout_truncated", "stderr_truncated")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., stdout_truncated: _Optional[bool] = ..., stderr_truncated: _Optional[bool] = ...) -> None: ...

class TtySize(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class ExecStart(_message.Message):
    __slots__ = ("request_id", "container_id", "exec_id", "process", "stdin", "tty_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    container_id: str
    exec_id: str
    process: Process
    stdin: bool
    tty_size: TtySize
    def __init__(self, request_id: _Optional[str] = ..., container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process: _Optional[_Union[Process, _Mapping]] = ..., stdin: _Optional[bool] = ..., tty_size: _Optional[_Union[TtySize, _Mapping]] = ...) -> None: ...

class AttachStart(_message.Message):
    __slots__ = ("container_id", "stdin", "stdout", "stderr", "tty_size")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    stdin: bool
    stdout: bool
    stderr: bool
    tty_size: TtySize
    def __init__(self, container_id: _Optional[str] = ..., stdin: _Optional[bool] = ..., stdout: _Optional[bool] = ..., stderr: _Optional[bool] = ..., tty_size: _Optional[_Union[TtySize, _Mapping]] = ...) -> None: ...

class StdioInput(_message.Message):
    __slots__ = ("start", "attach", "stdin", "close_stdin", "resize", "output_ack")
    START_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ACK_FIELD_NUMBER: _ClassVar[int]
    start: ExecStart
    attach: AttachStart
    stdin: bytes
    close_stdin: bool
    resize: TtySize
    output_ack: int
    def __init__(self, start: _Optional[_Union[ExecStart, _Mapping]] = ..., attach: _Optional[_Union[AttachStart, _Mapping]] = ..., stdin: _Optional[bytes] = ..., close_stdin: _Optional[bool] = ..., resize: _Optional[_Union[TtySize, _Mapping]] = ..., output_ack: _Optional[int] = ...) -> None: ...

class StdioOutput(_message.Message):
    __slots__ = ("started_pid", "stdout", "stderr", "exit", "stdin_ack")
    STARTED_PID_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    STDIN_ACK_FIELD_NUMBER: _ClassVar[int]
    started_pid: int
    stdout: bytes
    stderr: bytes
    exit: ExitStatus
    stdin_ack: int
    def __init__(self, started_pid: _Optional[int] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exit: _Optional[_Union[ExitStatus, _Mapping]] = ..., stdin_ack: _Optional[int] = ...) -> None: ...

class ReadStdioRequest(_message.Message):
    __slots__ = ("container_id", "offset", "follow")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    offset: int
    follow: bool
    def __init__(self, container_id: _Optional[str] = ..., offset: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class StdioChunk(_message.Message):
    __slots__ = ("offset", "stream", "data", "time_unix_nanos", "eof")
    class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STDOUT: _ClassVar[StdioChunk.Stream]
        STDERR: _ClassVar[StdioChunk.Stream]
    STDOUT: StdioChunk.Stream
    STDERR: StdioChunk.Stream
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    offset: int
    stream: StdioChunk.Stream
    data: bytes
    time_unix_nanos: int
    eof: bool
    def __init__(self, offset: _Optional[int] = ..., stream: _Optional[_Union[StdioChunk.Stream, str]] = ..., data: _Optional[bytes] = ..., time_unix_nanos: _Optional[int] = ..., eof: _Optional[bool] = ...) -> None: ...

class PortForwardStart(_message.Message):
    __slots__ = ("port", "address")
    PORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    port: int
    address: str
    def __init__(self, port: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class PortForwardInput(_message.Message):
    __slots__ = ("start", "data", "close_write", "ack")
    START_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_WRITE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    start: PortForwardStart
    data: bytes
    close_write: bool
    ack: int
    def __init__(self, start: _Optional[_Union[PortForwardStart, _Mapping]] = ..., data: _Optional[bytes] = ..., close_write: _Optional[bool] = ..., ack: _Optional[int] = ...) -> None: ...

class PortForwardOutput(_message.Message):
    __slots__ = ("connected", "data", "eof", "ack")
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    connected: bool
    data: bytes
    eof: bool
    ack: int
    def __init__(self, connected: _Optional[bool] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., ack: _Optional[int] = ...) -> None: ...
