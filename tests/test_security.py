"""The security review of issue 18, in code: log paths and directories that cannot escape,
streaming URLs on loopback with unguessable single-use tokens, tight modes on the socket and
the state, and registry credentials that never reach the log. Each against the real daemon
(inert backend) unless it is a property of one function."""

from __future__ import annotations

import base64
import os
import stat
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from criserver import daemon as daemon_module
from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.config import Config, StreamingConfig
from criserver.errors import InvalidArgument
from criserver.runtime.container_create import _log_path
from criserver.store.db import Database
from criserver.store.records import PodRecord
from tests.cri_client import CRIClient, msg
from tests.daemon import Daemon
from tests.image.oci import Pusher
from tests.registry import PASSWORD, USER, Registry, small_image

# Log paths and directories -----------------------------------------------------------------


async def _pod(cri: CRIClient, logs: Path) -> str:
    return await cri.run_pod("sec", log_directory=str(logs))


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("log_path", ["../escape.log", "a/../../escape.log", "/etc/escape.log",
                                      "..", "", "x\0.log"])
async def test_a_log_path_never_leaves_the_log_directory(cri: CRIClient, tmp_path: Path,
                                                         log_path: str) -> None:
    pod = await _pod(cri, tmp_path / "logs")
    code = await _code(cri.create_container(pod, "c", pod_name="sec", log_path=log_path))
    # "" is no log at all; every other one is refused before anything is made.
    assert code == (grpc.StatusCode.OK if log_path == "" else grpc.StatusCode.INVALID_ARGUMENT)
    assert not (tmp_path / "escape.log").exists()


@pytest.mark.parametrize("directory", ["relative/logs", "logs\0x"])
async def test_a_log_directory_is_absolute(cri: CRIClient, directory: str) -> None:
    # Relative, the daemon would have resolved it against its own working directory.
    code = await _code(cri.run_pod("rel", log_directory=directory))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not (await cri.runtime.ListPodSandbox()).items


def test_the_root_as_log_directory_holds_its_files() -> None:
    # The old prefix test ("//") refused every log path under a log directory of "/".
    pod = PodRecord("p", cri.PodSandboxConfig(log_directory="/"), "inert", 0)
    assert _log_path(pod, cri.ContainerConfig(log_path="c/0.log")) == "/c/0.log"
    with pytest.raises(InvalidArgument):
        _log_path(pod, cri.ContainerConfig(log_path="../.."))


async def test_a_symlinked_directory_in_the_log_directory_is_not_followed(
        cri: CRIClient, tmp_path: Path) -> None:
    logs, outside = tmp_path / "logs", tmp_path / "outside"
    logs.mkdir()
    outside.mkdir()
    (logs / "c").symlink_to(outside)  # what a pod with the log dir as a volume could do
    pod = await _pod(cri, logs)
    cid = await cri.create_container(pod, "c", pod_name="sec", log_path="c/0.log")
    code = await _code(cri.runtime.StartContainer(msg("StartContainerRequest",
                                                      container_id=cid)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert list(outside.iterdir()) == []


async def test_a_symlink_as_the_log_file_is_not_followed(cri: CRIClient, tmp_path: Path) -> None:
    logs, target = tmp_path / "logs", tmp_path / "precious"
    (logs / "c").mkdir(parents=True)
    target.write_text("keep\n")
    (logs / "c" / "0.log").symlink_to(target)
    pod = await _pod(cri, logs)
    cid = await cri.create_container(pod, "c", pod_name="sec", log_path="c/0.log")
    code = await _code(cri.runtime.StartContainer(msg("StartContainerRequest",
                                                      container_id=cid)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert target.read_text() == "keep\n"


async def test_reopen_checks_the_log_path_again(cri: CRIClient, tmp_path: Path) -> None:
    logs, outside = tmp_path / "logs", tmp_path / "outside"
    outside.mkdir()
    pod = await _pod(cri, logs)
    cid = await cri.create_container(pod, "c", pod_name="sec", log_path="c/0.log")
    await cri.runtime.StartContainer(msg("StartContainerRequest", container_id=cid))
    assert (logs / "c" / "0.log").exists()
    # Between start and a rotation, the directory becomes a link out.
    (logs / "c" / "0.log").unlink()
    (logs / "c").rmdir()
    (logs / "c").symlink_to(outside)
    code = await _code(cri.runtime.ReopenContainerLog(msg("ReopenContainerLogRequest",
                                                          container_id=cid)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert list(outside.iterdir()) == []


# Modes of what the daemon makes -----------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_socket_state_and_database_modes(daemon: Daemon, cri: CRIClient,
                                               tmp_path: Path) -> None:
    await _pod(cri, tmp_path / "logs")  # the database has records
    assert _mode(daemon.socket) == 0o660  # root and the socket group only
    for directory in (daemon.root, daemon.state):
        assert _mode(directory) & 0o022 == 0, directory  # nobody else writes
    database = daemon.root / "criserver.db"
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        # Container configs, environment variables included: root only.
        assert _mode(path) == 0o600, path
    for path in [daemon.root, daemon.state, *daemon.root.rglob("*"), *daemon.state.rglob("*")]:
        if not path.is_symlink():
            assert _mode(path) & 0o002 == 0, f"{path} is world-writable"


async def test_an_old_world_readable_database_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "criserver.db"
    db = await Database.open(path)
    await db.close()
    path.chmod(0o644)  # as an older criserver left it, under umask 022
    db = await Database.open(path)
    try:
        assert _mode(path) == 0o600
    finally:
        await db.close()


# Streaming ---------------------------------------------------------------------------------

def test_the_streaming_server_listens_on_loopback_by_default() -> None:
    assert StreamingConfig().address == "127.0.0.1"


@pytest.fixture
async def streamable(tmp_path: Path) -> AsyncIterator[CRIClient]:
    """A daemon whose default handler hands out streaming URLs."""
    daemon = Daemon(tmp_path, config='[runtime]\ndefault_handler = "s"\n[runtimes.s]\n'
                    'backend = "tests.backends.featured:StreamableBackend"\n').start()
    client = daemon.client()
    try:
        yield client
    finally:
        await client.close()
        daemon.kill()


async def test_streaming_urls_are_loopback_unguessable_and_single_use(
        streamable: CRIClient) -> None:
    pod = await streamable.run_pod("stream")
    urls = [(await streamable.runtime.PortForward(msg("PortForwardRequest", pod_sandbox_id=pod,
                                                      port=[80]))).url for _ in range(2)]
    parsed = [urllib.parse.urlsplit(u) for u in urls]
    assert {p.hostname for p in parsed} == {"127.0.0.1"}
    tokens = [p.path.rsplit("/", 1)[1] for p in parsed]
    assert tokens[0] != tokens[1]
    for token in tokens:  # 24 random bytes, URL-safe base64: 192 bits
        assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) >= 24
    async with aiohttp.ClientSession() as session:
        async with session.post(urls[0]) as first:
            assert first.status != 404  # the token worked once (not a stream: refused later)
        async with session.post(urls[0]) as second:
            assert second.status == 404
        near = tokens[1][:-1] + ("B" if tokens[1].endswith("A") else "A")  # one char off
        async with session.post(urls[1].replace(tokens[1], near)) as guessed:
            assert guessed.status == 404


# Secrets -----------------------------------------------------------------------------------

async def test_registry_credentials_never_reach_the_log(daemon: Daemon, cri: CRIClient,
                                                        auth_registry: Registry) -> None:
    async with aiohttp.ClientSession() as session:
        await Pusher(session, auth_registry.base, auth_registry.authorization).image(
            "private/sec", "1", small_image("secret image\n"))
    ref = f"{auth_registry.host}/private/sec:1"
    wrong, encoded = "not-the-pw-1", base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for auth in (msg("AuthConfig", username=USER, password=wrong),
                 msg("AuthConfig", auth=base64.b64encode(f"{USER}:{wrong}".encode()).decode()),
                 msg("AuthConfig", username=USER, password=PASSWORD,
                     identity_token="idtok-secret-2", registry_token="regtok-secret-3"),
                 msg("AuthConfig", auth=encoded)):
        await _code(cri.image.PullImage(msg("PullImageRequest", image=msg("ImageSpec", image=ref),
                                            auth=auth)))
    status = await cri.image.ImageStatus(msg("ImageStatusRequest",
                                             image=msg("ImageSpec", image=ref)))
    assert status.image.id  # the right password did pull it
    text = daemon.log()  # at debug level: everything the daemon says
    for secret in (PASSWORD, wrong, encoded, "idtok-secret-2", "regtok-secret-3",
                   base64.b64encode(f"{USER}:{wrong}".encode()).decode()):
        assert secret not in text, f"{secret!r} is in the daemon's log"


async def test_the_socket_is_closed_to_others_before_it_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The mode was set after the server started: under umask 0 the socket took anyone's
    # calls for that moment.
    path = tmp_path / "cri.sock"
    modes: list[int] = []
    real_server = grpc.aio.server

    def server(*args: object, **kwargs: object) -> grpc.aio.Server:
        made = real_server(*args, **kwargs)  # type: ignore[arg-type]
        start = made.start

        async def recording_start() -> None:
            modes.append(_mode(path))
            await start()

        made.start = recording_start  # type: ignore[method-assign]
        return made

    monkeypatch.setattr(daemon_module.grpc.aio, "server", server)
    old_umask = os.umask(0)
    try:
        served = await daemon_module._listen(Config(), path, [])
    finally:
        os.umask(old_umask)
    await served.stop(0)
    assert modes == [0o660]
