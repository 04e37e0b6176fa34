"""Host side of the guest-agent channel: one HTTP/2 (grpclib) connection per pod to vmagent, over
QEMU's virtio-serial chardev socket or AF_VSOCK, with a timeout on every call, a wait for the
guest to boot, reconnection after the connection drops, and errors that name the pod and call.

The agent's answers are untrusted (the guest may be broken or hostile): a message larger than
MAX_MESSAGE_BYTES, one that does not decode, or HTTP/2 the client cannot follow is a protocol
violation. The client then closes for good, and tells its owner why (`on_violation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.client import Channel
from grpclib.client import Handler as _ClientHandler
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import Connection, H2Protocol, Stream
from h2.events import UnknownFrameReceived
from h2.exceptions import ProtocolError as H2ProtocolError

from criserver import errors
from criserver.vm.qemu import AgentTransport, VsockTransport
from vmagent.api import agent_pb2 as pb
from vmagent.api.agent_grpc import AgentStub, HealthStub
from vmagent.contract import AGENT_VSOCK_PORT
from vmagent.steps import STEPS_HEADER, TRACE_HEADER, Steps, current, span

log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
# A connection whose calls time out this many times in a row is presumed dead on the guest side
# (the agent restarted and now discards our frames): the next call opens a new one.
_TIMEOUTS_BEFORE_RECONNECT = 2
# The largest message the agent may send: ExecSync's reply with both outputs at their limit
# (the backend asks for at most 16 MiB each), and room. grpclib itself has no limit: a length
# prefix of 4 GiB would have it buffer that much.
MAX_MESSAGE_BYTES = 40 * 1024 * 1024

_STATUS_ERRORS: dict[Status, type[errors.CriError]] = {
    Status.NOT_FOUND: errors.NotFound,
    Status.INVALID_ARGUMENT: errors.InvalidArgument,
    Status.ALREADY_EXISTS: errors.AlreadyExists,
    Status.FAILED_PRECONDITION: errors.FailedPrecondition,
    Status.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    Status.UNIMPLEMENTED: errors.Unimplemented,
    Status.UNAVAILABLE: errors.Unavailable,
    Status.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
}


class ConnState(enum.Enum):
    IDLE = "idle"  # no connection; the next call opens one
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"  # close() was called: calls fail at once


@dataclass(frozen=True)
class AgentAddress:
    """Where the agent listens: QEMU's chardev socket (virtio-serial) or a vsock (cid, port)."""

    unix_path: str | None = None
    vsock_cid: int | None = None
    vsock_port: int = AGENT_VSOCK_PORT

    def __post_init__(self) -> None:
        if (self.unix_path is None) == (self.vsock_cid is None):
            raise ValueError("AgentAddress needs exactly one of unix_path and vsock_cid")

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"vsock:{self.vsock_cid}:{self.vsock_port}"

    @classmethod
    def of(cls, transport: AgentTransport) -> AgentAddress:
        """Where the agent of a VM started with `transport` is reached from the host."""
        if isinstance(transport, VsockTransport):
            return cls(vsock_cid=transport.guest_cid)
        return cls(unix_path=str(transport.socket_path))


class AgentProtocolError(ProtocolError):
    """The agent sent what the protocol does not allow (see the module's docstring)."""


# What grpclib raises on a message it cannot take: a compressed one (NotImplementedError), one
# cut short by the end of its stream (AssertionError), one that does not decode.
_MALFORMED = (AgentProtocolError, DecodeError, NotImplementedError, AssertionError)
_LOST = (StreamTerminatedError, ProtocolError, ConnectionError, OSError)


class _BoundedStream(Stream):
    """A grpclib stream that refuses to read a message larger than MAX_MESSAGE_BYTES."""

    async def recv_data(self, size: int) -> bytes:
        if size > MAX_MESSAGE_BYTES:
            raise AgentProtocolError(f"a message of {size} bytes, over the limit of "
                                     f"{MAX_MESSAGE_BYTES}")
        return await super().recv_data(size)


class _BoundedConnection(Connection):
    def create_stream(self, *, stream_id: int | None = None, wrapper: Any = None) -> Stream:
        return _BoundedStream(self, self._connection, self._transport, stream_id=stream_id,
                              wrapper=wrapper)


class _WatchedH2Protocol(H2Protocol):
    """grpclib's client protocol, plus a callback when the connection goes away, bounded
    messages, and a callback when the peer breaks HTTP/2."""

    on_lost: Callable[[_WatchedH2Protocol, BaseException | None], None] | None = None
    on_violation: Callable[[str], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Same state, one method more (create_stream): grpclib builds its Connection here.
        self.connection.__class__ = _BoundedConnection

    def data_received(self, data: bytes) -> None:
        # grpclib's own, except that an HTTP/2 error or a frame grpclib has no handler for
        # (PUSH_PROMISE, a 1xx answer: NotImplementedError) is reported, not just logged.
        try:
            events = self.connection.feed(data)
            self.connection.flush()
            for event in events:
                if not isinstance(event, UnknownFrameReceived):  # HTTP/2: ignored, not an error
                    self.processor.process(event)
            self.connection.flush()
        except (H2ProtocolError, NotImplementedError) as exc:
            if self.on_violation is not None:
                self.on_violation(f"HTTP/2: {type(exc).__name__}: {exc}")
            self.processor.close("Protocol error")  # fails the pending streams

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)  # fails the connection's pending streams
        if self.on_lost is not None:
            self.on_lost(self, exc)


class _AgentChannel(Channel):
    """A grpclib Channel that can also dial AF_VSOCK and reports connection loss.
    Relies on grpclib 0.4.9's `_protocol_factory`/`_create_connection` seams (pinned)."""

    def __init__(
        self,
        address: AgentAddress,
        on_lost: Callable[[_WatchedH2Protocol, BaseException | None], None],
        on_violation: Callable[[str], None],
    ) -> None:
        if address.unix_path is not None:
            super().__init__(path=address.unix_path)
        else:
            # host/port only shape the :authority header; the socket is made below.
            super().__init__(host="localhost", port=address.vsock_port)
        self._address = address
        self._on_lost = on_lost
        self._on_violation = on_violation

    def _protocol_factory(self) -> H2Protocol:
        protocol = _WatchedH2Protocol(_ClientHandler(), self._config, self._h2_config)
        protocol.on_lost = self._on_lost
        protocol.on_violation = self._on_violation
        return protocol

    async def _create_connection(self) -> H2Protocol:
        if self._address.vsock_cid is None:
            return await super()._create_connection()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (self._address.vsock_cid, self._address.vsock_port))
            _, protocol = await loop.create_connection(self._protocol_factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        return protocol


class AgentClient:
    """The daemon's handle on one pod's agent.

    Every call has a timeout. A dropped connection fails the calls pending on it at once (with
    `Unavailable`) and the next call opens a new HTTP/2 connection: that is also what happens
    after a daemon restart, since the agent serves each new connection from scratch. Calls that
    change guest state carry request ids (see agent.proto), so a caller may retry them.

    A protocol violation by the agent closes the client for good: every call then fails with
    FailedPrecondition naming the violation, and `on_violation` (if given) is called once.
    """

    def __init__(
        self,
        pod_id: str,
        address: AgentAddress,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        on_violation: Callable[[str], None] | None = None,
    ) -> None:
        self.pod_id = pod_id
        self.address = address
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self._state = ConnState.IDLE
        self._channel: _AgentChannel | None = None
        self._lock = asyncio.Lock()
        self._timeouts = 0
        self.connects = 0
        # The agent identity seen by the last Health.Check: a change means the guest rebooted
        # or the agent restarted, and the caller must re-sync its view of the pod.
        self.agent_instance_id: str | None = None
        # Why the client closed itself: the agent broke the protocol.
        self.violation: str | None = None
        self._on_violation = on_violation

    @property
    def state(self) -> ConnState:
        return self._state

    def _closed(self) -> bool:
        return self._state is ConnState.CLOSED

    def _err(self, cls: type[errors.CriError], call: str, detail: str) -> errors.CriError:
        return cls(f"pod {self.pod_id}: agent call {call} ({self.address}): {detail}")

    def _closed_err(self, call: str) -> errors.CriError:
        if self.violation is not None:
            return self._err(errors.FailedPrecondition, call,
                             f"the agent broke the protocol: {self.violation}")
        return self._err(errors.FailedPrecondition, call, "client is closed")

    def _violated(self, reason: str) -> None:
        """The agent broke the protocol: close for good, and say why once."""
        if self.violation is not None or self._closed():
            return
        self.violation = reason
        log.warning("agent broke the protocol, giving up on it pod=%s address=%s reason=%s",
                    self.pod_id, self.address, reason)
        self.close()
        if self._on_violation is not None:
            self._on_violation(reason)

    def _malformed(self, call: str, exc: BaseException) -> errors.CriError:
        self._violated(f"{call}: {type(exc).__name__}: {exc}")
        return self._closed_err(call)

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection if there is none. Raises Unavailable or DeadlineExceeded."""
        if self._closed():
            raise self._closed_err("connect")
        if self._state is ConnState.READY:
            return
        async with self._lock:
            if self._state is not ConnState.IDLE:
                if self._closed():
                    raise self._closed_err("connect")
                return
            self._state = ConnState.CONNECTING
            channel = _AgentChannel(self.address, self._on_lost, self._violated)
            try:
                await asyncio.wait_for(channel.__connect__(), self.connect_timeout)
            except BaseException as exc:
                channel.close()
                if not self._closed():
                    self._state = ConnState.IDLE
                if isinstance(exc, TimeoutError):
                    raise self._err(errors.DeadlineExceeded, "connect",
                                    f"no connection within {self.connect_timeout:.1f}s") from exc
                if isinstance(exc, OSError):
                    raise self._err(errors.Unavailable, "connect", str(exc)) from exc
                raise
            if self._closed():  # close() was called while we connected
                channel.close()
                raise self._closed_err("connect")
            self._channel = channel
            self._timeouts = 0
            self.connects += 1
            self._state = ConnState.READY
            log.info("agent connected pod=%s address=%s connects=%d", self.pod_id,
                     self.address, self.connects)

    def _on_lost(self, protocol: _WatchedH2Protocol, exc: BaseException | None) -> None:
        channel = self._channel
        if channel is None or getattr(channel, "_protocol", None) is not protocol:
            return  # an older connection we already dropped
        self._channel = None
        if self._state is ConnState.READY:
            self._state = ConnState.IDLE
        # Closed even though the connection is gone: grpclib's Channel only forgets its
        # protocol on close(), and one collected unclosed logs "Unclosed connection".
        channel.close()
        log.warning("agent connection lost pod=%s address=%s error=%s", self.pod_id,
                    self.address, exc)

    def _drop(self) -> None:
        channel, self._channel = self._channel, None
        if self._state is ConnState.READY:
            self._state = ConnState.IDLE
        if channel is not None:
            channel.close()  # fails the streams still pending on it

    def close(self) -> None:
        self._state = ConnState.CLOSED
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    # --- calls -----------------------------------------------------------------------------

    async def call(self, name: str, request: Any, *, timeout: float | None = None,
                   _count_timeouts: bool = True) -> Any:
        """Unary call `name` of the Health or Agent service, mapped to criserver errors."""
        timeout = self.call_timeout if timeout is None else timeout
        await self.connect()
        channel = self._channel
        if channel is None:
            raise self._err(errors.Unavailable, name, "connection lost")
        stub: Any = HealthStub(channel) if name == "Check" else AgentStub(channel)
        steps = current()
        try:
            if steps is None:
                reply = await getattr(stub, name)(request, timeout=timeout)
            else:
                reply = await self._traced_call(getattr(stub, name), name, request, timeout,
                                                steps)
        except _MALFORMED as exc:
            raise self._malformed(name, exc) from exc
        except GRPCError as exc:
            self._timeouts = 0
            cls = _STATUS_ERRORS.get(exc.status, errors.Internal)
            raise self._err(cls, name, f"{exc.status.name}: {exc.message}") from exc
        except TimeoutError as exc:
            if _count_timeouts:
                self._timeouts += 1
                if self._timeouts >= _TIMEOUTS_BEFORE_RECONNECT and self._channel is channel:
                    log.warning("agent unresponsive, reconnecting pod=%s timeouts=%d",
                                self.pod_id, self._timeouts)
                    self._drop()
            raise self._err(errors.DeadlineExceeded, name,
                            f"no answer within {timeout:.1f}s") from exc
        except _LOST as exc:
            if self.violation is not None:  # the agent broke HTTP/2
                raise self._closed_err(name) from exc
            if self._channel is channel:
                self._drop()
            raise self._err(errors.Unavailable, name, f"connection lost: {exc}") from exc
        self._timeouts = 0
        return reply

    @staticmethod
    async def _traced_call(method: Any, name: str, request: Any, timeout: float,
                           steps: Steps) -> Any:
        """What grpclib's unary call does, asking the agent for its step timings and adding
        them to `steps` as guest.<name>.<step>, beside the round trip agent.<name>."""
        with span(f"agent.{name}"):
            async with method.open(timeout=timeout, metadata={TRACE_HEADER: "1"}) as s:
                await s.send_message(request, end=True)
                reply = await s.recv_message()
                await s.recv_trailing_metadata()
        trailers = s.trailing_metadata or {}
        for step, ms in Steps.decode(str(trailers.get(STEPS_HEADER, ""))).items():
            steps.add(f"guest.{name}.{step}", ms)
        return reply

    async def stream(self, name: str, request: Any) -> AsyncIterator[Any]:
        """Server-streaming call `name` (e.g. ReadStdio): yields replies until the agent ends the
        stream. No timeout (streams live as long as what they follow); cancel to stop.

        :raises Unavailable: the connection dropped; other errors as `call`.
        """
        await self.connect()
        channel = self._channel
        if channel is None:
            raise self._err(errors.Unavailable, name, "connection lost")
        method = getattr(AgentStub(channel), name)
        try:
            async with method.open() as s:
                await s.send_message(request, end=True)
                async for reply in s:
                    yield reply
        except _MALFORMED as exc:
            raise self._malformed(name, exc) from exc
        except GRPCError as exc:
            cls = _STATUS_ERRORS.get(exc.status, errors.Internal)
            raise self._err(cls, name, f"{exc.status.name}: {exc.message}") from exc
        except _LOST as exc:
            if self.violation is not None:
                raise self._closed_err(name) from exc
            if self._channel is channel:
                self._drop()
            raise self._err(errors.Unavailable, name, f"connection lost: {exc}") from exc

    @contextlib.asynccontextmanager
    async def duplex(self, name: str) -> AsyncIterator[DuplexStream]:
        """Bidirectional call `name` (Exec, Attach, PortForward). No timeout; leaving the block
        before the agent ended the stream (an error, a cancellation) resets it, which the agent
        takes as "the client is gone". Only the stream's own operations raise mapped errors:
        exceptions from the caller's code pass through untouched.
        """
        await self.connect()
        channel = self._channel
        if channel is None:
            raise self._err(errors.Unavailable, name, "connection lost")
        method = getattr(AgentStub(channel), name)
        stream = method.open()
        try:
            await stream.__aenter__()
        except _LOST as exc:
            if self.violation is not None:
                raise self._closed_err(name) from exc
            if self._channel is channel:
                self._drop()
            raise self._err(errors.Unavailable, name, f"connection lost: {exc}") from exc
        duplex = DuplexStream(self, channel, name, stream)
        try:
            yield duplex
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await stream.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        with contextlib.suppress(Exception):
            await stream.__aexit__(None, None, None)

    async def check(self, *, timeout: float | None = None) -> pb.CheckResponse:
        reply: pb.CheckResponse = await self.call("Check", pb.CheckRequest(), timeout=timeout)
        if self.agent_instance_id not in (None, reply.agent_instance_id):
            log.warning("agent restarted pod=%s old=%s new=%s", self.pod_id,
                        self.agent_instance_id, reply.agent_instance_id)
        self.agent_instance_id = reply.agent_instance_id
        return reply

    async def wait_ready(self, deadline: float) -> pb.CheckResponse:
        """Retry Health.Check until it answers or `deadline` (time.monotonic()) passes.

        Used right after QEMU starts: QEMU accepts the connection long before the agent runs
        and holds our bytes until the guest opens the port, so a connection that does not
        answer yet is kept (its queued checks get answered) rather than replaced.
        """
        attempt_timeout = 1.0
        backoff = 0.02
        last: Exception | None = None
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._err(errors.DeadlineExceeded, "wait_ready",
                                f"agent did not answer after {attempts} attempts: {last}")
            attempts += 1
            try:
                return await self.check(timeout=min(attempt_timeout, remaining))
            except errors.DeadlineExceeded as exc:
                last = exc
                attempt_timeout = min(attempt_timeout * 2, 8.0)
                # check() counted this timeout; during boot silence is expected.
                self._timeouts = 0
            except (errors.Unavailable, errors.FailedPrecondition) as exc:
                if self._state is ConnState.CLOSED:
                    raise
                last = exc
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 0.5)

    async def setup_sandbox(self, request: pb.SetupSandboxRequest) -> pb.SetupSandboxResponse:
        reply: pb.SetupSandboxResponse = await self.call("SetupSandbox", request)
        return reply

    async def exec_sync(self, request: pb.ExecSyncRequest,
                        timeout: float | None = None) -> pb.ExecSyncResponse:
        """The call's timeout defaults to the process timeout plus the usual call timeout."""
        if timeout is None:
            timeout = request.timeout_seconds + self.call_timeout if request.timeout_seconds \
                else None
        reply: pb.ExecSyncResponse = await self.call("ExecSync", request, timeout=timeout)
        return reply

    async def stats(self, request: pb.StatsRequest | None = None) -> pb.StatsResponse:
        reply: pb.StatsResponse = await self.call("Stats", request or pb.StatsRequest())
        return reply

    async def shutdown(self, action: int = pb.ShutdownRequest.POWEROFF) -> None:
        await self.call("Shutdown", pb.ShutdownRequest(action=action))  # type: ignore[arg-type]


class DuplexStream:
    """One open bidirectional agent call: sends are serialised (a message's frames never
    interleave with another's), errors come out as criserver errors naming the pod and call."""

    def __init__(self, client: AgentClient, channel: _AgentChannel, name: str,
                 stream: Any) -> None:
        self._client = client
        self._channel = channel
        self._name = name
        self._stream = stream
        self._send_lock = asyncio.Lock()
        self._ended = False

    def _map(self, exc: Exception) -> errors.CriError:
        c = self._client
        if isinstance(exc, _MALFORMED):
            return c._malformed(self._name, exc)
        if c.violation is not None:
            return c._closed_err(self._name)
        if isinstance(exc, StreamTerminatedError):
            # The agent answered with an error status and reset the stream (it had not read
            # all we sent): the status is in the headers or trailers it sent first.
            try:
                self._stream._maybe_raise()
            except GRPCError as status:
                exc = status
        if isinstance(exc, GRPCError):
            cls = _STATUS_ERRORS.get(exc.status, errors.Internal)
            return c._err(cls, self._name, f"{exc.status.name}: {exc.message}")
        if c._channel is self._channel and not isinstance(exc, StreamTerminatedError):
            c._drop()  # the connection itself broke, not just this stream
        return c._err(errors.Unavailable, self._name, f"connection lost: {exc}")

    def violation(self, reason: str) -> errors.CriError:
        """The agent broke this stream's protocol (`reason`): its client gives up on it (see
        AgentClient); the error to raise."""
        return self._client._malformed(self._name, AgentProtocolError(reason))

    async def send(self, message: Any, *, end: bool = False) -> None:
        """Send one message (`end`: and half-close our side). A no-op once ended."""
        async with self._send_lock:
            if self._ended:
                return
            try:
                await self._stream.send_message(message, end=end)
            except (GRPCError, StreamTerminatedError, ProtocolError, ConnectionError,
                    OSError) as exc:
                raise self._map(exc) from exc
            self._ended = end

    async def end(self) -> None:
        """Half-close our side (the agent's next recv sees the end)."""
        async with self._send_lock:
            if self._ended:
                return
            try:
                await self._stream.end()
            except (GRPCError, StreamTerminatedError, ProtocolError, ConnectionError,
                    OSError) as exc:
                raise self._map(exc) from exc
            self._ended = True

    async def recv(self) -> Any | None:
        """The next message, or None when the agent ended the stream successfully."""
        try:
            message = await self._stream.recv_message()
        except (GRPCError, *_LOST, *_MALFORMED) as exc:
            raise self._map(exc) from exc
        if message is not None:
            return message
        # The agent is done. An error status after some messages comes in the trailers,
        # which grpclib reads only once our side has ended too.
        await self.end()
        try:
            await self._stream.recv_trailing_metadata()
            return None
        except (GRPCError, StreamTerminatedError, ProtocolError, ConnectionError,
                OSError) as exc:
            raise self._map(exc) from exc
