"""The CRI surface fuzzed against the real daemon (issue 18): random bytes as request bodies,
random and malformed messages built from the reference proto, and random sequences of calls on
live pods and containers (wrong orders, prefixes of several IDs, removals twice).

Every answer must be a deliberate gRPC status: UNKNOWN means an unhandled path and INTERNAL a
client mistake blamed on the daemon. The daemon must stay up, and once every pod is removed
nothing of them may be left (lists, state directories, netns, mounts, monitors).

Random messages go to the `inert` test backend (every pod it gets is a record): a random pod
or container on the host could map host ports or place cgroups anywhere. As root, the call
orders also run on the real `runc` handler, with configs of the test's own. No VM is booted.
Short by default (the unit suite); CRISERVER_FUZZ_EXAMPLES=N runs N examples per test with fresh
randomness (docs/reliability.md).
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from criserver.errors import InvalidArgument
from criserver.image import reference
from tests.cri_client import enum, msg, reference_pool
from tests.daemon import INERT_BACKEND, Daemon, process_cmdlines, unmount_under
from tests.registry import Registry

EXAMPLES = int(os.environ.get("CRISERVER_FUZZ_EXAMPLES", "0"))
ROOT = os.geteuid() == 0
CALL_TIMEOUT = 60.0
# Never a deliberate answer: UNKNOWN is an exception nobody mapped, INTERNAL the daemon's fault.
NOT_DELIBERATE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVICES = ("runtime.v1.RuntimeService", "runtime.v1.ImageService")


def fuzz_settings(short: int, **kwargs: Any) -> settings:
    """`short` examples in the unit suite (the same ones every run), CRISERVER_FUZZ_EXAMPLES
    fresh random ones by hand."""
    return settings(max_examples=EXAMPLES or short, deadline=None, database=None,
                    derandomize=not EXAMPLES, print_blob=True,
                    suppress_health_check=list(HealthCheck), **kwargs)


def all_methods() -> list[MethodDescriptor]:
    pool = reference_pool()
    return [m for service in SERVICES for m in pool.FindServiceByName(service).methods
            if not m.client_streaming]


# A server stream is read this long: GetContainerEvents never ends by itself.
STREAM_READ = 0.5


class RawClient:
    """Synchronous CRI calls by method name, on bytes or reference-proto messages."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self._methods = {m.name: m for m in all_methods()}

    def close(self) -> None:
        self.channel.close()

    def raw(self, method: str, body: bytes) -> tuple[grpc.StatusCode, bytes, str]:
        descriptor = self._methods[method]
        if descriptor.server_streaming:
            return self._stream(descriptor, body)
        call = self.channel.unary_unary(
            f"/{descriptor.containing_service.full_name}/{method}",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            return grpc.StatusCode.OK, call(body, timeout=CALL_TIMEOUT), ""
        except grpc.RpcError as exc:
            return exc.code(), b"", exc.details() or ""  # type: ignore[attr-defined]

    def _stream(self, descriptor: MethodDescriptor,
                body: bytes) -> tuple[grpc.StatusCode, bytes, str]:
        """Up to STREAM_READ seconds of the stream: its status, or OK when the client's
        deadline ended it (a stream that runs on is no error)."""
        call = self.channel.unary_stream(
            f"/{descriptor.containing_service.full_name}/{descriptor.name}",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            for _ in call(body, timeout=STREAM_READ):
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                return exc.code(), b"", exc.details() or ""  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, b"", ""

    def call(self, method: str, request: Message) -> tuple[grpc.StatusCode, Any, str]:
        code, body, details = self.raw(method, request.SerializeToString())
        out = message_factory.GetMessageClass(self._methods[method].output_type)
        return code, out.FromString(body) if code == grpc.StatusCode.OK else None, details


ANSWERS: Counter[str] = Counter()


def check_answer(method: str, code: grpc.StatusCode, details: str) -> None:
    if currently_in_test_context():  # the answers' spread: --hypothesis-show-statistics
        event(f"{method} {code.name}")
    ANSWERS[f"{method} {code.name}"] += 1
    assert code not in NOT_DELIBERATE, f"{method} answered {code.name}: {details}"


# Shared by the strategies: what exists in the daemon, so requests can name it ---------------

class World:
    def __init__(self, workdir: Path, registry: str, image: str) -> None:
        self.workdir = workdir
        self.registry = registry
        self.image = image
        self.ids: list[str] = []  # every pod and container ID the daemon ever answered
        self.host_ids: set[str] = set()  # those on runc: never named in random configs
        self.kept: set[str] = set()  # the mounts the daemon holds for good
        self.daemon: Daemon | None = None
        self.image_ids: list[str] = []


WORLD: World | None = None


def _world() -> World:
    assert WORLD is not None
    return WORLD


def _prefixes(value: str) -> list[str]:
    return [value[:n] for n in (1, 2, 3, 12)] + [value, value + "0", value.upper()]


@st.composite
def object_ids(draw: st.DrawFn) -> str:
    """A live or dead ID, a prefix of one (often of several), or something else entirely."""
    world = _world()
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=70))
    if kind == 1:
        return draw(st.text(alphabet="0123456789abcdef", max_size=64))
    # The pool grows as the daemon answers: the same draws whatever it holds, so hypothesis
    # sees a strategy that does not depend on outside state.
    index = draw(st.integers(0, 1 << 16))
    known = [p for i in world.ids + world.image_ids if i not in world.host_ids
             for p in _prefixes(i)]
    return known[index % len(known)] if known and kind == 3 else ""


ODD_STRINGS = ["", ".", "..", "/", "../../../etc/passwd", "a/../../b", "\x00", "a\x00b", "\n",
               "-", "--help", "$(id)", "%s%n", "\u202e", "a" * 254, "a" * 4097, "x" * 70_000]


def texts() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=40), st.sampled_from(ODD_STRINGS),
                     st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=12))


def image_refs() -> st.SearchStrategy[str]:
    """Image references that never leave the host: garbage, names on the test registry, the
    image it holds, IDs and their prefixes."""
    world = _world()

    def local(text: str) -> str:
        try:
            ref = reference.parse(text)
        except InvalidArgument:
            return text  # refused before any network
        return text if ref.domain == world.registry else f"{world.registry}/{ref.path}"

    # Every reference that parses is moved to the test registry, IDs and prefixes included
    # (a bare "abc" is docker.io/library/abc).
    return st.one_of(st.just(world.image), st.one_of(
        texts(), object_ids(),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/:.-_@", max_size=40)).map(local))


def host_paths() -> st.SearchStrategy[str]:
    world = _world()
    return st.one_of(st.sampled_from(["", "relative/path", "..", "/nonexistent/fuzz",
                                      "/proc/self/../../nonexistent", "\x00"]),
                     texts().map(lambda t: str(world.workdir / "host" / t.replace("/", "_"))))


def log_directories() -> st.SearchStrategy[str]:
    world = _world()
    return st.one_of(st.sampled_from(["", "relative", "..", "logs/../.."]),
                     texts().map(lambda t: str(world.workdir / "logs" / t.replace("/", "_"))))


FIELD_STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "image": image_refs,
    "host_path": host_paths,
    "log_directory": log_directories,
    "runtime_handler": lambda: st.sampled_from(["", "inert", "microvm", "kata", "\x00", "Inert"]),
    # Never a usable CIDR: the host's routing would take it.
    "pod_cidr": lambda: st.sampled_from(["", "garbage", "10.0.0.0/33", "300.1.2.3/8", "::/200",
                                         ",", "10.1.2.3/8/8"]),
    # Container commands never do anything but fail or sleep on the host.
    "command": lambda: st.sampled_from(["", "sleep", "/nonexistent", "\x00", "true"]),
    "args": lambda: st.sampled_from(["3600", "", "-x"]),
    "cmd": lambda: st.sampled_from(["true", "sleep", "/nonexistent", ""]),
}


def _int_range(bits: int, signed: bool) -> st.SearchStrategy[int]:
    if signed:
        return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return st.integers(0, (1 << bits) - 1)


F = FieldDescriptor
INTS = {F.TYPE_INT32: (32, True), F.TYPE_SINT32: (32, True), F.TYPE_SFIXED32: (32, True),
        F.TYPE_INT64: (64, True), F.TYPE_SINT64: (64, True), F.TYPE_SFIXED64: (64, True),
        F.TYPE_UINT32: (32, False), F.TYPE_FIXED32: (32, False),
        F.TYPE_UINT64: (64, False), F.TYPE_FIXED64: (64, False)}


def scalars(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    override = FIELD_STRATEGIES.get(field.name)
    if override is not None:
        return override()
    if field.type == F.TYPE_STRING:
        return object_ids() if field.name == "id" or field.name.endswith("_id") else texts()
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type in INTS:
        bits, signed = INTS[field.type]
        # Mostly small numbers (timeouts, ports, ...), sometimes the extremes.
        return st.one_of(st.integers(-2, 70000).filter(lambda i: signed or i >= 0),
                         _int_range(bits, signed))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == F.TYPE_FLOAT else 64)
    if field.type == F.TYPE_ENUM:
        # proto3 enums are open: numbers no CRI version defines reach the daemon as they are.
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _int_range(32, True))
    raise AssertionError(f"no strategy for {field.full_name}")


MAX_DEPTH = 5


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor` with a random subset of its fields set to random values."""
    out = message_factory.GetMessageClass(descriptor)()
    fields = [f for f in descriptor.fields
              if depth < MAX_DEPTH or f.type != F.TYPE_MESSAGE]
    if not fields:
        return out
    for field in draw(st.lists(st.sampled_from(fields), unique=True, max_size=8)):
        target = getattr(out, field.name) if field.is_repeated else None
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            if draw(st.integers(0, 9)) == 0:
                # Past the 256 KiB Kubernetes allows for annotations and labels.
                if value_field.type == F.TYPE_STRING and key_field.type == F.TYPE_STRING:
                    target["k"] = "v" * 300_000  # type: ignore[index]
                continue
            for _ in range(draw(st.integers(0, 4))):
                key = draw(scalars(key_field))
                if value_field.type == F.TYPE_MESSAGE:
                    target[key].CopyFrom(  # type: ignore[index]
                        draw(messages(value_field.message_type, depth + 1)))
                else:
                    target[key] = draw(scalars(value_field))  # type: ignore[index]
        elif field.is_repeated:
            count = draw(st.integers(0, 3))
            for _ in range(count):
                if field.type == F.TYPE_MESSAGE:
                    target.add().CopyFrom(  # type: ignore[union-attr]
                        draw(messages(field.message_type, depth + 1)))
                else:
                    target.append(draw(scalars(field)))  # type: ignore[union-attr]
        elif field.type == F.TYPE_MESSAGE:
            getattr(out, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
        else:
            setattr(out, field.name, draw(scalars(field)))
    return out


# The daemon ----------------------------------------------------------------------------------

def fuzz_config(workdir: Path, ctrmon: Path | None) -> str:
    """Every pod that names no handler on `inert`, host-namespace and privileged ones too;
    `runc` only when named."""
    inert = f'[runtimes.inert]\nbackend = "{INERT_BACKEND}"\n'
    routes = ('[runtime]\ndefault_handler = "inert"\nhost_namespaces_handler = "inert"\n'
              'privileged_handler = "inert"\n')
    if ctrmon is None:
        return routes + inert
    from tests.e2e.conftest import handler_config, network_config

    return (routes + network_config(workdir)
            + handler_config("runc", "runc", monitor=str(ctrmon)) + inert)


def leftovers(daemon: Daemon, ids: list[str], kept: set[str]) -> list[str]:
    """What the daemon keeps of objects that are gone: anything under its root or state dir
    named after one of their IDs, mounts (but the `kept` ones, which it holds for good) and
    netns under its work dir, and processes (monitors) naming its work dir."""
    found = []
    for top in (daemon.root, daemon.state):
        for path in top.rglob("*") if top.exists() else ():
            if any(i in path.name for i in ids):
                found.append(f"file {path}")
    workdir = str(daemon.workdir)
    found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(workdir + "/") and line.split()[1] not in kept]
    netns = daemon.state / "netns"
    found += [f"netns {p}" for p in netns.glob("*")] if netns.exists() else []
    found += [f"process {pid} {cmd}" for pid, cmd in process_cmdlines().items()
              if workdir in cmd and pid != daemon.pid]
    return found


@pytest.fixture(scope="module")
def fuzz_daemon(registry: Registry, busybox_ref: str) -> Iterator[Daemon]:
    global WORLD
    workdir = Path(tempfile.mkdtemp(prefix="crf-", dir="/tmp"))
    ctrmon = None
    if ROOT and shutil.which("runc"):
        from criserver.backends.runc.build import build_ctrmon

        ctrmon = workdir / "ctrmon"
        build_ctrmon(ctrmon)
    daemon = Daemon(workdir, config=fuzz_config(workdir, ctrmon)).start()
    WORLD = World(workdir, registry.host, busybox_ref)
    client = RawClient(daemon.socket)
    code, _, details = client.call("PullImage", msg(
        "PullImageRequest", image=msg("ImageSpec", image=busybox_ref)))
    assert code == grpc.StatusCode.OK, details
    if ctrmon is not None:
        warm_up(client, busybox_ref)
    kept = {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{workdir}/")}
    WORLD.kept, WORLD.daemon = kept, daemon
    try:
        yield daemon
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()[-5000:]
        remove_everything(client)
        for method in ("ListPodSandbox", "ListContainers", "ListImages", "ListContainerStats",
                       "ListPodSandboxStats", "ListPodSandboxMetrics", "ListMetricDescriptors"):
            code, _, details = client.call(method, msg(f"{method}Request"))
            assert code == grpc.StatusCode.OK, (method, details)
        assert leftovers(daemon, WORLD.ids, kept) == []
        report = os.environ.get("CRISERVER_FUZZ_REPORT")
        if report:  # every call's answer, counted: the figures in docs/reliability.md
            Path(report).write_text("".join(f"{n} {a}\n" for a, n in sorted(ANSWERS.items())))
    finally:
        client.close()
        WORLD = None
        daemon.kill()
        if ctrmon is not None:
            from tests.e2e.conftest import remove_network

            remove_network(daemon)
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def warm_up(client: RawClient, image: str) -> None:
    """A first runc pod and container, removed: the daemon mounts the directories it shares
    between pods (kept for good, as `ip netns` keeps /run/netns) on first use."""
    code, pod, details = client.call("RunPodSandbox", msg(
        "RunPodSandboxRequest", runtime_handler="runc", config=msg(
            "PodSandboxConfig", metadata=msg("PodSandboxMetadata", name="warm", namespace="fuzz",
                                             uid="warm"))))
    assert code == grpc.StatusCode.OK, details
    code, _, details = client.call("CreateContainer", msg(
        "CreateContainerRequest", pod_sandbox_id=pod.pod_sandbox_id, config=msg(
            "ContainerConfig", metadata=msg("ContainerMetadata", name="warm"),
            image=msg("ImageSpec", image=image), command=["true"])))
    assert code == grpc.StatusCode.OK, details
    remove_everything(client)


def remove_everything(client: RawClient) -> None:
    """What kubelet does when every pod is deleted; afterwards the lists are empty."""
    code, pods, details = client.call("ListPodSandbox", msg("ListPodSandboxRequest"))
    assert code == grpc.StatusCode.OK, details
    for pod in pods.items:
        for method in ("StopPodSandbox", "RemovePodSandbox"):
            code, _, details = client.call(method, msg(f"{method}Request",
                                                       pod_sandbox_id=pod.id))
            assert code == grpc.StatusCode.OK, (method, pod.id, details)
    code, listed, details = client.call("ListPodSandbox", msg("ListPodSandboxRequest"))
    assert code == grpc.StatusCode.OK and not listed.items, (listed, details)
    code, listed, details = client.call("ListContainers", msg("ListContainersRequest"))
    assert code == grpc.StatusCode.OK and not listed.containers, (listed, details)


@pytest.fixture
def fuzz(fuzz_daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(fuzz_daemon.socket)
    try:
        yield client
    finally:
        client.close()
    assert fuzz_daemon.process is not None and fuzz_daemon.process.poll() is None, \
        fuzz_daemon.log()[-5000:]


def _remember(method: str, response: Any) -> None:
    world = _world()
    for name in ("pod_sandbox_id", "container_id"):
        value = getattr(response, name, "") if response is not None else ""
        if value and method in ("RunPodSandbox", "CreateContainer"):
            world.ids.append(value)


# 1. Random bytes as the request body of every method -----------------------------------------

METHOD_NAMES = [m.name for m in all_methods()]
# Bodies every method gets besides the random ones: bad wire types, truncated varints and
# lengths, a field number 0, nesting deeper than any parser recursion limit.
def _nested(depth: int) -> bytes:
    body = b""
    for _ in range(depth):
        body = b"\x0a" + _varint(len(body)) + body
    return body


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


FIXED_BODIES = [b"\xff", b"\x08", b"\x0a\x05ab", b"\x00\x00", b"\x0a" + b"\x80" * 10,
                b"\x0a\x02\x0a\x00" * 50, b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x7e" * 200,
                _nested(200)]


@pytest.mark.parametrize("body", FIXED_BODIES, ids=range(len(FIXED_BODIES)))
def test_malformed_bodies_to_every_method(fuzz: RawClient, body: bytes) -> None:
    for method in METHOD_NAMES:
        code, _, details = fuzz.raw(method, body)
        check_answer(method, code, details)


@fuzz_settings(300)
@given(method=st.sampled_from(METHOD_NAMES), body=st.binary(max_size=512))
def test_random_bytes_to_every_method(fuzz: RawClient, method: str, body: bytes) -> None:
    code, _, details = fuzz.raw(method, body)
    check_answer(method, code, details)


# 2. Random and malformed messages ----------------------------------------------------------

def _descriptor(name: str) -> Descriptor:
    return reference_pool().FindMessageTypeByName(f"runtime.v1.{name}")


NAMES = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20)


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, Message]:
    """RunPodSandbox and CreateContainer with what validation wants set, the rest random: so
    the random fields reach the daemon's state and the backend, not only its checks."""
    if draw(st.booleans()):
        config = draw(messages(_descriptor("PodSandboxConfig")))
        config.metadata.name = draw(NAMES)
        config.metadata.namespace = "fuzz"
        config.metadata.uid = draw(NAMES)
        request = msg("RunPodSandboxRequest", config=config,
                      runtime_handler=draw(st.sampled_from(["", "inert"])))
        return "RunPodSandbox", request
    config = draw(messages(_descriptor("ContainerConfig")))
    config.metadata.name = draw(NAMES)
    config.image.image = draw(st.one_of(st.just(_world().image), image_refs()))
    request = msg("CreateContainerRequest", pod_sandbox_id=draw(object_ids()), config=config,
                  sandbox_config=draw(messages(_descriptor("PodSandboxConfig"))))
    return "CreateContainer", request


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Message]:
    if draw(st.integers(0, 3)) == 0:
        return draw(near_valid())
    method = draw(st.sampled_from(all_methods()))
    return method.name, draw(messages(method.input_type))


@fuzz_settings(500)
@given(request=requests())
def test_random_requests(fuzz: RawClient, request: tuple[str, Message]) -> None:
    method, message = request
    code, response, details = fuzz.call(method, message)
    check_answer(method, code, details)
    _remember(method, response)


# 3. Calls in every order on live objects ---------------------------------------------------

HANDLERS = ["inert", "runc"] if ROOT else ["inert"]
# How a call names an object: its ID, a prefix (often of several), or a near miss.
FORMS = ["id", "id", "prefix1", "prefix4", "suffix", "upper"]


def _named(value: str, form: str) -> str:
    return {"id": value, "prefix1": value[:1], "prefix4": value[:4], "suffix": value + "0",
            "upper": value.upper()}[form]


class Lifecycle(RuleBasedStateMachine):
    """Pods and containers driven in random orders, named by full IDs or prefixes. Besides the
    status codes, the model checks what must hold whatever the order: a removed object is not
    found, removing it again succeeds, and a started container does not start again.

    Objects are picked by index from lists that only grow, so what hypothesis draws never
    depends on the daemon's answers."""

    client: RawClient

    def __init__(self) -> None:
        super().__init__()
        self.pods: list[str] = []
        self.containers: list[str] = []
        self.removed: set[str] = set()
        self.started: set[str] = set()
        self.serial = 0

    def _call(self, method: str, **fields: Any) -> tuple[grpc.StatusCode, Any, str]:
        code, response, details = self.client.call(method, msg(f"{method}Request", **fields))
        check_answer(method, code, details)
        _remember(method, response)
        return code, response, details

    @staticmethod
    def _pick(objects: list[str], index: int) -> str:
        return objects[index % len(objects)] if objects else ""

    @initialize()
    def connect(self) -> None:
        """A pod per handler with a container in each, one of them started."""
        self.client = RawClient(Path(_world().workdir / "criserver.sock"))
        # Random RemoveImage calls may have removed it.
        code, _, details = self.client.call("PullImage", msg(
            "PullImageRequest", image=msg("ImageSpec", image=_world().image)))
        assert code == grpc.StatusCode.OK, details
        for handler in HANDLERS:
            self.run_pod(handler, host_network=False)
            self.create_container(len(self.pods) - 1, ["sleep", "3600"])
        self.start(0, "id")

    @rule(handler=st.sampled_from(HANDLERS), host_network=st.booleans())
    def run_pod(self, handler: str, host_network: bool) -> None:
        self.serial += 1
        name = f"lc{self.serial}"
        world = _world()
        options = msg("NamespaceOption", network=enum("NODE" if host_network else "POD"),
                      pid=enum("CONTAINER"))
        config = msg("PodSandboxConfig",
                     metadata=msg("PodSandboxMetadata", name=name, namespace="fuzz",
                                  uid=f"uid-{name}-{time.monotonic_ns()}"),
                     log_directory=str(world.workdir / "logs" / name),
                     linux=msg("LinuxPodSandboxConfig", security_context=msg(
                         "LinuxSandboxSecurityContext", namespace_options=options)))
        code, response, details = self._call("RunPodSandbox", config=config,
                                             runtime_handler=handler)
        assert code == grpc.StatusCode.OK, details
        if handler == "runc":
            world.host_ids.add(response.pod_sandbox_id)
        self.pods.append(str(response.pod_sandbox_id))

    @rule(index=st.integers(0, 1 << 16), command=st.sampled_from(
        [["sleep", "3600"], ["true"], ["/nonexistent"]]))
    def create_container(self, index: int, command: list[str]) -> None:
        pod = self._pick(self.pods, index)
        self.serial += 1
        name = f"c{self.serial}"
        code, response, details = self._call(
            "CreateContainer", pod_sandbox_id=pod,
            config=msg("ContainerConfig", metadata=msg("ContainerMetadata", name=name),
                       image=msg("ImageSpec", image=_world().image), command=command,
                       log_path=f"{name}/0.log"),
            sandbox_config=msg("PodSandboxConfig"))
        if pod in self.removed:
            assert code == grpc.StatusCode.NOT_FOUND, details
        if code == grpc.StatusCode.OK:
            if pod in _world().host_ids:
                _world().host_ids.add(response.container_id)
            self.containers.append(str(response.container_id))

    @rule(index=st.integers(0, 1 << 16), data=st.data())
    def create_odd_container(self, index: int, data: st.DataObject) -> None:
        """A container whose process settings are random (never its command: it sleeps),
        created and started: what the backend makes of odd users, directories, environments,
        terminals and limits."""
        pod = self._pick(self.pods, index)
        self.serial += 1
        name = f"o{self.serial}"
        draw = data.draw
        security = msg("LinuxContainerSecurityContext", readonly_rootfs=draw(st.booleans()))
        user = draw(st.sampled_from(["none", "uid", "name"]))
        if user == "uid":
            security.run_as_user.value = draw(st.sampled_from([0, 65534, 1 << 31, (1 << 32) - 1]))
            security.run_as_group.value = draw(st.integers(0, (1 << 32) - 1))
        elif user == "name":
            security.run_as_username = draw(st.sampled_from(["nobody", "root", "ghost", "1:2",
                                                             "a:b", "\n"]))
        envs = [msg("KeyValue", key=k, value=v.encode()) for k, v in draw(st.lists(
            st.tuples(st.sampled_from(["A", "", "=", "B=C", "\x01", "PATH"]), texts()),
            max_size=3))]
        resources = msg("LinuxContainerResources", cpu_shares=draw(st.sampled_from([0, 2, 1024])),
                        memory_limit_in_bytes=draw(st.sampled_from([0, 4096, 64 << 20])),
                        oom_score_adj=draw(st.sampled_from([0, -1000, 1000])))
        config = msg("ContainerConfig", metadata=msg("ContainerMetadata", name=name),
                     image=msg("ImageSpec", image=_world().image), command=["sleep", "3600"],
                     working_dir=draw(st.sampled_from(["", "/", "relative", "/no/such/dir",
                                                       "/etc/passwd", "/tmp/../.."])),
                     envs=envs, tty=draw(st.booleans()), stdin=draw(st.booleans()),
                     stdin_once=draw(st.booleans()), log_path=f"{name}.log",
                     linux=msg("LinuxContainerConfig", security_context=security,
                               resources=resources))
        code, response, _ = self._call("CreateContainer", pod_sandbox_id=pod,
                                             config=config,
                                             sandbox_config=msg("PodSandboxConfig"))
        if code != grpc.StatusCode.OK:
            return
        cid = str(response.container_id)
        if pod in _world().host_ids:
            _world().host_ids.add(cid)
        self.containers.append(cid)
        code, _, _ = self._call("StartContainer", container_id=cid)
        if code == grpc.StatusCode.OK:
            self.started.add(cid)

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS))
    def start(self, index: int, form: str) -> None:
        container = self._pick(self.containers, index)
        code, _, _ = self._call("StartContainer", container_id=_named(container, form))
        if form == "id" and container in self.started:
            # FAILED_PRECONDITION, or NOT_FOUND once removed (by a prefix or with its pod).
            assert code != grpc.StatusCode.OK, "a container started twice"
        if code == grpc.StatusCode.OK:
            self.started.add(container)

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS),
          timeout=st.sampled_from([0, 1, -1]))
    def stop(self, index: int, form: str, timeout: int) -> None:
        container = self._pick(self.containers, index)
        self._call("StopContainer", container_id=_named(container, form), timeout=timeout)

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS))
    def remove_container(self, index: int, form: str) -> None:
        container = self._pick(self.containers, index)
        code, _, details = self._call("RemoveContainer", container_id=_named(container, form))
        if form == "id" and container in self.removed:
            assert code == grpc.StatusCode.OK, f"a second remove: {details}"
        if form == "id" and code == grpc.StatusCode.OK:
            self.removed.add(container)

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS),
          cmd=st.sampled_from([["true"], ["sh", "-c", "exit 3"], []]))
    def exec_sync(self, index: int, form: str, cmd: list[str]) -> None:
        container = self._pick(self.containers, index)
        self._call("ExecSync", container_id=_named(container, form), cmd=cmd, timeout=5)

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS),
          which=st.sampled_from(["ContainerStatus", "ContainerStats", "ReopenContainerLog",
                                 "Exec", "Attach"]))
    def look_at_container(self, index: int, form: str, which: str) -> None:
        container = self._pick(self.containers, index)
        fields: dict[str, Any] = {"container_id": _named(container, form)}
        if which == "Exec":
            fields.update(cmd=["true"], stdout=True)
        if which == "Attach":
            fields.update(stdout=True)
        code, _, details = self._call(which, **fields)
        if form == "id" and container in self.removed and which == "ContainerStatus":
            assert code == grpc.StatusCode.NOT_FOUND, details

    @rule(index=st.integers(0, 1 << 16), cpu=st.integers(-1, 1 << 20))
    def update_resources(self, index: int, cpu: int) -> None:
        self._call("UpdateContainerResources", container_id=self._pick(self.containers, index),
                   linux=msg("LinuxContainerResources", cpu_shares=cpu, cpu_quota=cpu))

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS),
          which=st.sampled_from(["PodSandboxStatus", "PodSandboxStats", "PortForward",
                                 "StopPodSandbox"]))
    def look_at_pod(self, index: int, form: str, which: str) -> None:
        pod = self._pick(self.pods, index)
        code, _, details = self._call(which, pod_sandbox_id=_named(pod, form))
        if form == "id" and pod in self.removed and which == "PodSandboxStatus":
            assert code == grpc.StatusCode.NOT_FOUND, details

    @rule(index=st.integers(0, 1 << 16), form=st.sampled_from(FORMS))
    def remove_pod(self, index: int, form: str) -> None:
        pod = self._pick(self.pods, index)
        code, _, details = self._call("RemovePodSandbox", pod_sandbox_id=_named(pod, form))
        if form != "id":
            return
        if code == grpc.StatusCode.OK:
            self.removed.add(pod)
        code, _, details = self._call("RemovePodSandbox", pod_sandbox_id=pod)
        assert code == grpc.StatusCode.OK, f"a second remove: {details}"

    @rule(which=st.sampled_from(["PullImage", "RemoveImage", "ImageStatus"]),
          form=st.sampled_from(["ref", "id", "prefix"]))
    def image_call(self, which: str, form: str) -> None:
        """The image the containers run, removed under them, pulled again, looked at."""
        world = _world()
        name = world.image
        # Pulled by an ID or a prefix, it is a Docker Hub reference: the network.
        if form != "ref" and which != "PullImage":
            code, status, _ = self.client.call("ImageStatus", msg(
                "ImageStatusRequest", image=msg("ImageSpec", image=world.image)))
            image_id = status.image.id if code == grpc.StatusCode.OK and status.image.id else ""
            name = image_id if form == "id" else image_id.removeprefix("sha256:")[:6]
        code, _, details = self._call(f"{which}", image=msg("ImageSpec", image=name))
        if which == "RemoveImage" and form == "ref":
            assert code == grpc.StatusCode.OK, details
        if which == "PullImage" and form == "ref":
            assert code == grpc.StatusCode.OK, details

    @invariant()
    def lists_answer(self) -> None:
        if not hasattr(self, "client"):
            return
        for method in ("ListPodSandbox", "ListContainers", "ListImages"):
            code, _, details = self.client.call(method, msg(f"{method}Request"))
            assert code == grpc.StatusCode.OK, details

    def teardown(self) -> None:
        if hasattr(self, "client"):
            remove_everything(self.client)
            self.client.close()
            world = _world()
            assert world.daemon is not None
            assert leftovers(world.daemon, self.pods + self.containers, world.kept) == []


def test_calls_in_every_order(fuzz_daemon: Daemon) -> None:
    run_state_machine_as_test(
        Lifecycle, settings=fuzz_settings(12, stateful_step_count=25 if not EXAMPLES else 50))
