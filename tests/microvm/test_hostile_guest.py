"""A hostile guest against the host's real channel code (AgentClient, its streams, ContainerIO,
the exec relay): garbage, oversized and malformed messages, answers to requests never made,
lies, floods, stalls and a connection that drops in a loop (tests/microvm/hostile.py plays the
agent over the Unix socket a VM's agent port is). Each time the client stays bounded, a healthy
pod's agent beside it keeps answering, and a protocol violation closes the client with a
reason that its owner hears once."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criserver import errors
from criserver.backends.microvm import streams
from criserver.backends.microvm.channel import MAX_MESSAGE_BYTES, AgentAddress, AgentClient
from criserver.backends.microvm.container_io import MAX_REASON, ContainerIO
from criserver.runtime.streaming.interface import ByteSink
from tests.microvm.hostile import HostileAgent, Request, grpc_message
from vmagent.api import agent_pb2 as pb
from vmagent.credit import WINDOW


async def honest(request: Request) -> None:
    await request.reply(pb.CheckResponse(agent_instance_id="b").SerializeToString())


class Pods:
    """The hostile pod's client (`a`, violations recorded) and a healthy neighbour's (`b`)."""

    def __init__(self, tmp_path: Path) -> None:
        self.violations: list[str] = []
        self.a = AgentClient("pod-a", AgentAddress(unix_path=str(tmp_path / "a.sock")),
                             call_timeout=3, connect_timeout=2,
                             on_violation=self.violations.append)
        self.b = AgentClient("pod-b", AgentAddress(unix_path=str(tmp_path / "b.sock")),
                             call_timeout=3, connect_timeout=2)

    def hostile(self, behaviour: object = None, **kw: object) -> HostileAgent:
        return HostileAgent(self.a.address.unix_path or "", behaviour, **kw)  # type: ignore[arg-type]

    async def neighbour_answers(self) -> None:
        started = time.monotonic()
        reply = await self.b.check(timeout=2)
        assert reply.agent_instance_id == "b"
        assert time.monotonic() - started < 1.0

    def assert_broken(self, text: str) -> None:
        assert len(self.violations) == 1, self.violations
        assert text in self.violations[0]
        assert self.a.violation == self.violations[0]


@pytest.fixture
async def pods(tmp_path: Path) -> AsyncIterator[Pods]:
    p = Pods(tmp_path)
    async with HostileAgent(p.b.address.unix_path or "", honest):
        yield p
        p.a.close()
        p.b.close()


async def _broken_call(pods: Pods, text: str) -> errors.CriError:
    with pytest.raises(errors.FailedPrecondition) as info:
        await pods.a.check()
    assert "broke the protocol" in info.value.message and text in info.value.message
    pods.assert_broken(text)
    # Given up for good: the next call fails at once, without dialling the guest again.
    with pytest.raises(errors.FailedPrecondition, match="broke the protocol"):
        await pods.a.call("Stats", pb.StatsRequest())
    await pods.neighbour_answers()
    return info.value


# -- malformed messages ------------------------------------------------------------------------


async def test_oversized_message_is_refused_before_it_is_buffered(pods: Pods) -> None:
    sent: list[int] = []

    async def huge(request: Request) -> None:
        await request.headers()
        # A 4 GiB length prefix, then as much as the host's windows let through.
        sent.append(await request.data_frames(grpc_message(b"", length=2**32 - 1)))
        sent.append(await request.repeat(b"\0" * 65536, 1024))

    tracemalloc.start()
    try:
        async with pods.hostile(huge) as agent:
            await _broken_call(pods, "over the limit")
            await asyncio.wait_for(agent.connections[0].closed.wait(), 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The host read 5 bytes of it; what it holds is HTTP/2's window (4 MiB), not the message.
    assert peak < 16 << 20, peak
    assert MAX_MESSAGE_BYTES < 2**32 - 1


@pytest.mark.parametrize("case,payload,text", [
    ("compressed", grpc_message(b"\x0a\x01b", compressed=True), "NotImplementedError"),
    ("undecodable", grpc_message(b"\xff\xff\xff\xff"), "DecodeError"),
    ("truncated", grpc_message(b"\x0a\x01b", length=100), "AssertionError"),
])
async def test_malformed_answers_break_the_pod(pods: Pods, case: str, payload: bytes,
                                                text: str) -> None:
    async def answer(request: Request) -> None:
        await request.headers()
        await request.data_frames(payload, end=True)

    async with pods.hostile(answer):
        await _broken_call(pods, text)


# -- broken HTTP/2 -----------------------------------------------------------------------------


async def test_garbage_instead_of_http2(pods: Pods) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A DATA frame on stream 0, where only connection frames go; then noise.
        writer.write(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd" + b"\xde\xad\xbe\xef" * 64)
        await reader.read(65536)

    async with pods.hostile(on_connect=garbage):
        await _broken_call(pods, "HTTP/2")


async def test_answers_to_requests_never_made(pods: Pods) -> None:
    async def unsolicited(request: Request) -> None:
        # Data and headers on streams the host never opened (99: idle; 2: server-initiated).
        request.agent.writer.write(b"\x00\x00\x05\x00\x00\x00\x00\x00\x63" + b"hello")
        request.agent.writer.write(b"\x00\x00\x00\x01\x04\x00\x00\x00\x02")
        await request.agent.writer.drain()

    async with pods.hostile(unsolicited):
        await _broken_call(pods, "HTTP/2")


async def test_unknown_frame_types_are_ignored(pods: Pods) -> None:
    async def with_extension_frames(request: Request) -> None:
        # RFC 9113 4.1: a frame of an unknown type is ignored: not a violation.
        request.agent.writer.write(b"\x00\x00\x03\x42\x00\x00\x00\x00\x00abc")
        await request.reply(pb.CheckResponse(agent_instance_id="a").SerializeToString())

    async with pods.hostile(with_extension_frames):
        assert (await pods.a.check()).agent_instance_id == "a"
    assert pods.violations == []


# -- stalls and a connection that keeps dropping ------------------------------------------------


async def test_stall_mid_message_times_out_and_the_neighbour_is_unaffected(pods: Pods) -> None:
    async def stall(request: Request) -> None:
        await request.headers()
        await request.data_frames(grpc_message(b"\x0a\x01", length=1000))
        await asyncio.Event().wait()

    async with pods.hostile(stall):
        call = asyncio.create_task(pods.a.check(timeout=1.5))
        await asyncio.sleep(0.2)
        await pods.neighbour_answers()
        with pytest.raises(errors.DeadlineExceeded):
            await call
    assert pods.violations == []


async def test_disconnects_in_a_loop(pods: Pods) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with pods.hostile(on_connect=hang_up) as agent:
        with pytest.raises(errors.DeadlineExceeded):
            await pods.a.wait_ready(time.monotonic() + 2)
        # The client backs off between attempts rather than spinning on the guest.
        assert 2 <= agent.accepted <= 30, agent.accepted
        for _ in range(5):
            with pytest.raises(errors.Unavailable):
                await pods.a.check()
            await pods.neighbour_answers()
    assert pods.violations == []


# -- well-formed lies --------------------------------------------------------------------------


async def _lies(request: Request) -> None:
    if request.method == "WaitContainer":
        await request.reply(pb.ExitStatus(exit_code=-12345, reason="R" * 100_000,
                                          finished_at_unix_nanos=-5).SerializeToString())
    elif request.method == "ReadStdio":
        await request.headers()
        for chunk in (pb.StdioChunk(offset=0, stream=pb.StdioChunk.STDOUT, data=b"ok\n"),
                      pb.StdioChunk(offset=2**63, stream=7, data=b"nowhere\n" * 1000),
                      pb.StdioChunk(offset=1, stream=pb.StdioChunk.STDERR, data=b"back\n"),
                      pb.StdioChunk(offset=7, eof=True)):
            await request.data_frames(grpc_message(chunk.SerializeToString()))
        await request.trailers()
    else:
        await request.trailers(5, "no such thing")


async def test_lies_about_exits_and_output_are_recorded_sanely(tmp_path: Path,
                                                               pods: Pods) -> None:
    exits: list[tuple[str, int, str, str, int]] = []

    async def on_exit(cid: str, code: int, reason: str, message: str, at: int) -> None:
        exits.append((cid, code, reason, message, at))

    log_path = tmp_path / "c.log"
    async with pods.hostile(_lies):
        io = ContainerIO(pods.a, "c1", str(log_path), tmp_path / "c1.offset", on_exit)
        io.start()
        await asyncio.wait_for(io.exited.wait(), 10)
        await io.close()
    [(cid, code, reason, message, at)] = exits
    assert (cid, code, message) == ("c1", -12345, "")
    assert len(reason) == MAX_REASON
    assert at > time.time_ns() - 60 * 10**9  # not the guest's negative time
    lines = log_path.read_text().splitlines()
    assert [line.split(" ", 3)[1:] for line in lines] == [["stdout", "F", "ok"],
                                                         ["stderr", "F", "back"]]
    assert pods.violations == []


# -- floods --------------------------------------------------------------------------------------


class SlowSink(ByteSink):
    def __init__(self) -> None:
        self.received = 0

    async def write(self, data: bytes) -> None:
        self.received += len(data)
        await asyncio.sleep(0.05)

    async def close(self) -> None:
        pass


async def test_exec_output_past_the_credit_breaks_the_pod(pods: Pods) -> None:
    async def flood(request: Request) -> None:
        await request.headers()
        started = pb.StdioOutput(started_pid=-1).SerializeToString()
        await request.data_frames(grpc_message(started))
        chunk = grpc_message(pb.StdioOutput(stdout=b"x" * 65536).SerializeToString())
        for _ in range(200):  # 12.5 MiB, never waiting for an acknowledgement
            await request.data_frames(chunk)

    sink = SlowSink()
    async with pods.hostile(flood):
        with pytest.raises(errors.FailedPrecondition, match="over the window"):
            await asyncio.wait_for(streams.exec_in_vm(
                pods.a, "c1", ["sh"], tty=False, stdin=None, stdout=sink, stderr=None,
                resize=None), 10)
    pods.assert_broken("over the window")
    assert sink.received <= WINDOW
    await pods.neighbour_answers()


async def test_log_flood_is_written_with_bounded_memory(tmp_path: Path, pods: Pods) -> None:
    total = 48 << 20

    async def flood(request: Request) -> None:
        if request.method != "ReadStdio":
            await asyncio.Event().wait()  # WaitContainer: the container runs on
        await request.headers()
        data, offset = b"y" * 65535 + b"\n", 0
        while offset < total:
            chunk = pb.StdioChunk(offset=offset, data=data)
            await request.data_frames(grpc_message(chunk.SerializeToString()))
            offset += len(data)
        await asyncio.Event().wait()

    async def on_exit(*args: object) -> None:
        raise AssertionError("no exit was reported")

    log_path = tmp_path / "c.log"
    tracemalloc.start()
    try:
        async with pods.hostile(flood):
            io = ContainerIO(pods.a, "c1", str(log_path), tmp_path / "c1.offset", on_exit)
            io.start()
            deadline = time.monotonic() + 60
            while io._logged_offset < total and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                await pods.neighbour_answers()
            await io.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert io._logged_offset == total
    assert log_path.stat().st_size > total
    assert peak < 16 << 20, peak



def test_undefined_values_in_well_formed_answers() -> None:
    # Found by the agent_messages fuzz target: each raised (ValueError, KeyError) on the host.
    from criserver.api.runtime.v1 import api_pb2 as cri
    from criserver.backends.microvm.backend import guest_status_name
    from criserver.backends.microvm.container_io import stream_name
    from criserver.backends.microvm.guest_metrics import pod_stats
    from criserver.store.records import PodRecord

    assert guest_status_name(99) == "UNDEFINED(99)"
    assert stream_name(7) is None
    pod = PodRecord(id="ab" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                    created_at=1)
    lying = pb.StatsResponse(guest=pb.GuestStats(memory_total_bytes=1, memory_available_bytes=9))
    assert pod_stats(pod, lying).linux.memory.working_set_bytes.value == 0


async def test_the_backend_reports_the_pod_broken_with_the_reason(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from criserver.api.runtime.v1 import api_pb2 as cri
    from criserver.backends.microvm.backend import AGENT_BROKE_REASON, MicroVMBackend
    from criserver.config import Config
    from criserver.runtime.backend import BackendContext
    from criserver.store.records import PodRecord
    from criserver.vm.qemu import SerialTransport

    reports: list[tuple[str, str, str]] = []

    class Events:
        async def sandbox_exited(self, pod_id: str, reason: str, message: str) -> None:
            reports.append((pod_id, reason, message))

    context = BackendContext(handler="microvm", root=tmp_path / "root", state=tmp_path / "st",
                             config=Config(), events=Events())  # type: ignore[arg-type]
    backend = MicroVMBackend({"assets_dir": str(tmp_path / "no-assets")}, context)
    pod = PodRecord(id="ab" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                    created_at=1)
    backend._pods[pod.id] = SimpleNamespace(stopping=False)  # type: ignore[assignment]
    client = backend.agent_client(pod, SerialTransport(tmp_path / "a.sock", "agent"))

    async def undecodable(request: Request) -> None:
        await request.headers()
        await request.data_frames(grpc_message(b"\xff\xff\xff\xff"), end=True)

    async with HostileAgent(str(tmp_path / "a.sock"), undecodable):
        with pytest.raises(errors.FailedPrecondition):
            await client.check()
    for _ in range(10):
        await asyncio.sleep(0)
    [(pod_id, reason, message)] = reports
    assert (pod_id, reason) == (pod.id, AGENT_BROKE_REASON)
    assert "broke the protocol" in message and "DecodeError" in message
    client.close()
