"""Fuzz targets: each takes arbitrary bytes, feeds them to one parser of the daemon, and returns
when the parser answered or refused the input with its deliberate error. Any other exception
escapes and is a bug (atheris reports it as a crash; the seed replay test fails on it).

The targets import nothing from atheris: `tests.fuzz.run` drives them under atheris, and
`tests/fuzz/test_fuzz.py` replays their corpora in-process.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from google.protobuf.message import DecodeError

from criserver import config as daemon_config
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm import backend as microvm_backend
from criserver.backends.microvm import container_io, guest_metrics
from criserver.errors import CriError
from criserver.image import manifest as mf
from criserver.image import osboot, reference, unpack
from criserver.network.cni import CniResult, ConfigList
from criserver.runtime.streaming import spdy, websocket
from criserver.store.records import PodRecord
from vmagent.api import agent_pb2 as pb

Target = Callable[[bytes], None]


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _json(data: bytes) -> Any:
    """The document in `data`, or None when it is not JSON (refused before any parser)."""
    try:
        return mf.parse_json(data, "fuzz")
    except CriError:
        return None


# -- image references -------------------------------------------------------------------------


def image_reference(data: bytes) -> None:
    text = _text(data)
    reference.parse_image_id(text)
    reference.is_digest(text)
    try:
        ref = reference.parse(text)
    except CriError:
        return
    # A parsed reference prints as one that parses to itself.
    again = reference.parse(str(ref))
    assert again == ref, (text, ref, again)
    assert ref.tagged == "" or reference.parse(ref.tagged).name == ref.name


# -- manifests, indexes, configs (container and IronCore OS images) -----------------------------


def image_manifest(data: bytes) -> None:
    doc = _json(data)
    if doc is None:
        return
    media = mf.media_type_of(doc, "application/json")
    platform = mf.Platform()
    for step in (
        lambda: mf.select_platform(doc, platform, "fuzz"),
        lambda: mf.parse_manifest(doc, "fuzz"),
        lambda: mf.parse_config(doc, len(doc.get("layers") or ()) if isinstance(
            doc.get("layers"), list) else 0, "fuzz").as_dict(),
        lambda: osboot.refuse_as_container(doc, "fuzz"),
        lambda: osboot.parse_os_manifest(doc, "fuzz"),
        lambda: osboot.select_os_platform(doc, platform, "fuzz"),
        lambda: osboot._parse_config(data, "fuzz"),
    ):
        try:
            step()
        except CriError:
            pass
    assert isinstance(media, str)


# -- layer tars: whiteouts, links, limits, gzip and zstd ----------------------------------------

_LAYER_LIMITS = unpack.Limits(max_bytes=4 * 1024 * 1024, max_entries=512, allow_devices=False)


def layer_tar(data: bytes) -> None:
    """The first byte picks the compression (0 plain, 1 gzip, 2 zstd); the rest is the blob,
    applied onto a root holding a few lower-layer files, next to a directory that must stay
    untouched (nothing escapes the root)."""
    if not data:
        return
    compression = ("", "gzip", "zstd")[data[0] % 3]
    blob_bytes = data[1:]
    work = Path(tempfile.mkdtemp(prefix="fuzz-layer-"))
    try:
        root, outside = work / "root", work / "outside"
        for d in (root / "etc", root / "usr/lib", outside):
            d.mkdir(parents=True)
        (root / "etc/passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
        (root / "usr/lib/libc.so").write_bytes(b"lower")
        (outside / "secret").write_bytes(b"host")
        blob = work / "blob"
        blob.write_bytes(blob_bytes)
        digest = "sha256:" + hashlib.sha256(_decompressed(blob_bytes, compression)).hexdigest()
        try:
            unpack.apply_layer(root, blob, compression, digest, _LAYER_LIMITS, "fuzz")
        except unpack.LayerError:
            pass
        assert sorted(os.listdir(outside)) == ["secret"], "a layer wrote outside its root"
        assert (outside / "secret").read_bytes() == b"host", "a layer wrote outside its root"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _decompressed(blob: bytes, compression: str) -> bytes:
    """What the layer's diff_id covers, when it can be known (else any digest will do)."""
    try:
        if compression == "gzip":
            return gzip.decompress(blob)[:8 * 1024 * 1024]
        if compression == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(blob)[:8 << 20]
    except Exception:
        return b""
    return blob


# -- streaming: SPDY/3.1 and the WebSocket channel protocol ------------------------------------

_loop: asyncio.AbstractEventLoop | None = None


def _run(coro: Any) -> Any:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


class _Wire:
    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    async def drain(self) -> None:
        return None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _chunks(data: bytes) -> list[bytes]:
    """`data` cut where its first byte says: frames also arrive split across reads."""
    if not data:
        return []
    step = data[0] % 64 + 1
    body = data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)] if data[0] & 0x80 else [body]


def spdy_frames(data: bytes) -> None:
    async def session() -> None:
        wire = _Wire()
        streams: list[spdy.SpdyStream] = []

        def on_stream(stream: spdy.SpdyStream) -> bool:
            streams.append(stream)
            return stream.id % 4 == 1  # refuse every other stream

        s = spdy.SpdySession(cast(spdy.Wire, wire), on_stream, "fuzz")
        for chunk in _chunks(data):
            s.feed(chunk)
        for stream in streams:
            stream.header("x")
            stream._drop_input()
        s.feed_eof()
        assert s.closed

    _run(session())
    try:
        spdy.decode_header_block(data)
    except spdy.SpdyProtocolError:
        pass
    try:
        spdy.HeaderDecompressor().decompress(data)
    except spdy.SpdyProtocolError:
        pass


def websocket_frames(data: bytes) -> None:
    """Messages as the client sends them (4-byte length prefixes cut `data`), routed to the
    channels of one of the subprotocols."""
    if not data:
        return
    protocol = websocket.EXEC_PROTOCOLS[data[0] % len(websocket.EXEC_PROTOCOLS)]

    async def route() -> None:
        conn = websocket.ChannelConnection(cast(Any, None), protocol,
                                           {websocket.STDIN, websocket.RESIZE})
        rest = data[1:]
        while rest:
            size, rest = rest[0], rest[1:]
            message, rest = rest[:size], rest[size:]
            await conn._route(message)
            for queue in conn._inputs.values():  # a reader takes what came
                while not queue.empty():
                    queue.get_nowait()

    _run(route())


# -- CNI results and network configs ------------------------------------------------------------


def cni_result(data: bytes) -> None:
    doc = _json(data)
    if doc is None:
        return
    try:
        ConfigList.from_dict(doc, "fuzz").to_dict()
    except ValueError:
        pass
    try:
        result = CniResult.parse(doc)
    except ValueError:
        return
    result.pod_addresses()
    result.pod_ips()


# -- the daemon's TOML config ------------------------------------------------------------------


def config_toml(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".toml") as f:
        f.write(data)
        f.flush()
        try:
            daemon_config.load(Path(f.name))
        except daemon_config.ConfigError:
            pass


# -- what the host decodes from the guest agent ------------------------------------------------

_POD = PodRecord(id="ab" * 32, config=cri.PodSandboxConfig(), runtime_handler="microvm",
                 created_at=1)
_REPLIES = (pb.CheckResponse, pb.SetupSandboxResponse, pb.StatsResponse, pb.ContainerState,
            pb.ExitStatus, pb.ExecSyncResponse, pb.StdioOutput, pb.StdioChunk,
            pb.PortForwardOutput, pb.Empty)


def agent_messages(data: bytes) -> None:
    """Every reply type the host reads, decoded from the same bytes, then handed to the host
    code that turns it into CRI answers, log records or exit reports."""
    for kind in _REPLIES:
        try:
            message: Any = kind.FromString(data)
        except DecodeError:
            continue
        if isinstance(message, pb.StatsResponse):
            guest_metrics.pod_stats(_POD, message).SerializeToString()
            guest_metrics.pod_sample(message)
            for c in message.containers:
                guest_metrics.container_stats(c, None).SerializeToString()
        elif isinstance(message, pb.ContainerState):
            microvm_backend.guest_status_name(message.status)
        elif isinstance(message, pb.StdioChunk):
            container_io.stream_name(message.stream)
        elif isinstance(message, pb.ExitStatus):
            container_io.exit_report(message)


TARGETS: dict[str, Target] = {
    "image_reference": image_reference,
    "image_manifest": image_manifest,
    "layer_tar": layer_tar,
    "spdy_frames": spdy_frames,
    "websocket_frames": websocket_frames,
    "cni_result": cni_result,
    "config_toml": config_toml,
    "agent_messages": agent_messages,
}
