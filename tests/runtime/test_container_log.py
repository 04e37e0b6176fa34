"""The CRI log writer, read back with a parser written from the CRI logging format.

Format (kubelet's CRI log parser): `<RFC3339Nano timestamp> <stream> <tags> <content>\\n`, the
first tag "P" (partial) or "F" (full); a line is the contents of its P records plus its F record.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.runtime.container_log import MAX_LINE, ContainerLog, format_timestamp

TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")
T0 = 1475713029669794202  # 2016-10-06T00:17:09.669794202Z


@dataclass
class Record:
    time: bytes
    stream: str
    tag: str
    content: bytes


def parse_file(path: Path) -> list[Record]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "every record ends with a newline"
    records = []
    for raw in data.split(b"\n")[:-1]:
        ts, rest = raw.split(b" ", 1)
        assert TIMESTAMP.fullmatch(ts), raw
        stream, rest = rest.split(b" ", 1)
        assert stream in (b"stdout", b"stderr"), raw
        tags, content = rest.split(b" ", 1)
        tag = tags.split(b":")[0]
        assert tag in (b"P", b"F"), raw
        records.append(Record(ts, stream.decode(), tag.decode(), content))
    return records


def lines(records: list[Record]) -> list[tuple[str, bytes]]:
    """Whole lines per stream in file order of their F record; unfinished ones last."""
    out: list[tuple[str, bytes]] = []
    pending: dict[str, bytes] = {}
    for r in records:
        pending[r.stream] = pending.get(r.stream, b"") + r.content
        if r.tag == "F":
            out.append((r.stream, pending.pop(r.stream)))
    out += [(stream, data) for stream, data in pending.items()]
    return out


def test_timestamp_format() -> None:
    assert format_timestamp(T0) == "2016-10-06T00:17:09.669794202Z"
    assert format_timestamp(1_000_000_000) == "1970-01-01T00:00:01.000000000Z"
    now = dt.datetime.now(dt.UTC)
    parsed = dt.datetime.fromisoformat(format_timestamp(int(now.timestamp() * 1e9))[:26] + "+00:00")
    assert abs((parsed - now).total_seconds()) < 1


async def test_full_lines_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    await log.write("stdout", b"hello\n\nworld \n", time_ns=T0)
    await log.close()
    assert path.read_bytes() == (
        b"2016-10-06T00:17:09.669794202Z stdout F hello\n"
        b"2016-10-06T00:17:09.669794202Z stdout F \n"
        b"2016-10-06T00:17:09.669794202Z stdout F world \n"
    )


async def test_default_timestamp_is_now(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    before = dt.datetime.now(dt.UTC)
    await log.write("stderr", b"x\n")
    await log.close()
    (record,) = parse_file(path)
    stamp = dt.datetime.fromisoformat(record.time[:26].decode() + "+00:00")
    assert before - dt.timedelta(seconds=1) <= stamp <= dt.datetime.now(dt.UTC)


async def test_partial_line_waits_for_newline(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    await log.write("stdout", b"hel")
    assert parse_file(path) == []
    await log.write("stdout", b"lo\nwor")
    assert lines(parse_file(path)) == [("stdout", b"hello")]
    await log.write("stdout", b"ld\n")
    await log.close()
    records = parse_file(path)
    assert [r.tag for r in records] == ["F", "F"]
    assert lines(records) == [("stdout", b"hello"), ("stdout", b"world")]


async def test_streams_interleave_independently(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    await log.write("stdout", b"out-")
    await log.write("stderr", b"err-1\nerr-")
    await log.write("stdout", b"1\n")
    await log.write("stderr", b"2\n")
    await log.close()
    assert lines(parse_file(path)) == [
        ("stderr", b"err-1"), ("stdout", b"out-1"), ("stderr", b"err-2"),
    ]


@pytest.mark.parametrize(
    ("length", "tags"),
    [
        (MAX_LINE - 1, ["F"]),
        (MAX_LINE, ["F"]),
        (MAX_LINE + 1, ["P", "F"]),
        (2 * MAX_LINE, ["P", "F"]),
        (2 * MAX_LINE + 7, ["P", "P", "F"]),
    ],
)
async def test_long_lines_split(tmp_path: Path, length: int, tags: list[str]) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    line = bytes(ord("a") + i % 26 for i in range(length))
    await log.write("stdout", line + b"\n")
    await log.close()
    records = parse_file(path)
    assert [r.tag for r in records] == tags
    assert all(len(r.content) <= MAX_LINE for r in records)
    assert lines(records) == [("stdout", line)]


async def test_long_partial_is_cut_before_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path), max_line=10)
    await log.write("stdout", b"0123456789abcdefghijKLM")  # 23 bytes, no newline yet
    records = parse_file(path)
    assert [(r.tag, r.content) for r in records] == [("P", b"0123456789"), ("P", b"abcdefghij")]
    await log.write("stderr", b"e\n")
    await log.write("stdout", b"NOP\n")
    await log.close()
    assert lines(parse_file(path)) == [
        ("stderr", b"e"), ("stdout", b"0123456789abcdefghijKLMNOP"),
    ]


async def test_unlimited_line_size(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path), max_line=0)
    await log.write("stdout", b"x" * (3 * MAX_LINE) + b"\n")
    await log.close()
    assert [r.tag for r in parse_file(path)] == ["F"]


async def test_trailing_partial_written_at_close(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    await log.write("stdout", b"done\nno newline", time_ns=T0)
    await log.write("stderr", b"err tail", time_ns=T0 + 1)
    await log.close()
    records = parse_file(path)
    assert [(r.stream, r.tag, r.content) for r in records] == [
        ("stdout", "F", b"done"), ("stdout", "P", b"no newline"), ("stderr", "P", b"err tail"),
    ]
    await log.close()  # idempotent
    with pytest.raises(FailedPrecondition):
        await log.write("stdout", b"late\n")


async def test_reopen_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    rotated = tmp_path / "c.log.20240101"
    log = ContainerLog(str(path))
    await log.write("stdout", b"before\npart")
    os.rename(path, rotated)
    await log.write("stdout", b"-still-old\n")  # the fd still points at the renamed file
    await log.reopen()
    assert path.exists() and parse_file(path) == []
    await log.write("stdout", b"after\nial")
    await log.write("stdout", b"\n")
    await log.close()
    assert lines(parse_file(rotated)) == [("stdout", b"before"), ("stdout", b"part-still-old")]
    assert lines(parse_file(path)) == [("stdout", b"after"), ("stdout", b"ial")]


async def test_partial_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    await log.write("stderr", b"par")
    os.rename(path, tmp_path / "old.log")
    await log.reopen()
    await log.write("stderr", b"tial\n")
    await log.close()
    assert lines(parse_file(path)) == [("stderr", b"partial")]
    assert parse_file(tmp_path / "old.log") == []


async def test_creates_parent_directories_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "pods" / "ns_pod_uid" / "ctr" / "0.log"
    log = ContainerLog(str(path))
    await log.open()
    assert path.exists()
    await log.write("stdout", b"x\n")
    await log.close()
    assert stat.S_IMODE(path.stat().st_mode) & 0o777 == 0o640 & ~_umask()
    assert lines(parse_file(path)) == [("stdout", b"x")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    first = ContainerLog(str(path))
    await first.write("stdout", b"one\n")
    await first.close()
    second = ContainerLog(str(path))  # e.g. the daemon restarted
    await second.write("stdout", b"two\n")
    await second.close()
    assert lines(parse_file(path)) == [("stdout", b"one"), ("stdout", b"two")]


async def test_binary_content_kept(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path))
    payload = bytes(range(256)).replace(b"\n", b"")
    await log.write("stdout", payload + b"\r\n")
    await log.close()
    assert lines(parse_file(path)) == [("stdout", payload + b"\r")]


async def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ContainerLog(str(path), max_line=64)

    async def writer(stream: str, n: int) -> None:
        for i in range(n):
            # Lines cut at odd places, some longer than max_line.
            line = f"{stream}-{i}-".encode() + b"z" * (i % 100) + b"\n"
            mid = len(line) // 3
            await log.write(stream, line[:mid])
            await log.write(stream, line[mid:])

    await asyncio.gather(writer("stdout", 300), writer("stderr", 300))
    await log.close()
    got = lines(parse_file(path))
    for stream in ("stdout", "stderr"):
        mine = [data for s, data in got if s == stream]
        assert mine == [f"{stream}-{i}-".encode() + b"z" * (i % 100) for i in range(300)]


async def test_unknown_stream_refused(tmp_path: Path) -> None:
    log = ContainerLog(str(tmp_path / "c.log"))
    with pytest.raises(InvalidArgument):
        await log.write("stdin", b"x\n")
    await log.close()
