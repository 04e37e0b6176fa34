"""Real docker-registry processes (open and htpasswd) and test images pushed to them: shared by
the image tests and the end-to-end tests (fixtures exported through tests/conftest.py)."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.image.oci import E, Image, Layer, Pusher, tar_bytes

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "puller", "s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    proc: subprocess.Popen[bytes]
    authorization: str | None = None  # the header value pushes need

    @property
    def base(self) -> str:
        return f"http://{self.host}"


def _bcrypt_line(user: str, password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # libxcrypt does bcrypt ($2b$), which docker-registry's htpasswd accepts

        return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n"


def _start_registry(workdir: Path, htpasswd: bool) -> Registry:
    workdir.mkdir(parents=True)
    port = free_port()
    auth = ""
    if htpasswd:
        (workdir / "htpasswd").write_text(_bcrypt_line(USER, PASSWORD))
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {workdir / 'htpasswd'}\n"
    (workdir / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(workdir / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            break
        except urllib.error.HTTPError as exc:  # 401 from the htpasswd one: it is up
            if exc.code == 401:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"docker-registry did not start: "
                               f"{(workdir / 'registry.log').read_text()[-2000:]}")
        time.sleep(0.05)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return Registry(f"127.0.0.1:{port}", proc, basic if htpasswd else None)


def _stop(registry: Registry) -> None:
    registry.proc.terminate()
    try:
        registry.proc.wait(5)
    except subprocess.TimeoutExpired:
        registry.proc.kill()
        registry.proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not shutil.which(REGISTRY_BIN):
        pytest.skip("docker-registry is not installed")
    reg = _start_registry(tmp_path_factory.mktemp("registry") / "open", htpasswd=False)
    try:
        yield reg
    finally:
        _stop(reg)


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if not shutil.which(REGISTRY_BIN):
        pytest.skip("docker-registry is not installed")
    reg = _start_registry(tmp_path_factory.mktemp("registry") / "auth", htpasswd=True)
    try:
        yield reg
    finally:
        _stop(reg)


# -- test images -------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")
T0 = 1_600_000_000


def busybox_image(compressions: tuple[str, str, str] = ("gzip", "zstd", "")) -> Image:
    """Three layers exercising what unpacking must get right: busybox with symlinks and a
    hardlink, ownership, set-uid, xattrs; then whiteouts of a file and a directory, an opaque
    directory, and a changed file."""
    busybox = BUSYBOX.read_bytes()
    base = [
        E("bin", "dir", mode=0o755),
        E("bin/busybox", data=busybox, mode=0o755),
        E("bin/sh", "sym", link="busybox"),
        E("bin/ls", "link", link="bin/busybox"),
        E("etc", "dir", mode=0o755),
        E("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        E("etc/old", "dir", mode=0o755),
        E("etc/old/a.txt", data=b"a"),
        E("etc/old/b.txt", data=b"b"),
        E("tmp", "dir", mode=0o1777),
        E("tmp/gone", data=b"to be whited out"),
        E("var/lib/data", "dir", mode=0o700, uid=1000, gid=1000),
        E("var/lib/data/x", data=b"x"),
        E("usr/bin/suid", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000,
          mtime=T0 + 12345),
        E("usr/bin/tagged", data=b"t", xattrs={"user.origin": "layer1"}),
    ]
    change = [
        E("tmp/.wh.gone"),
        E("etc/old", "dir", mode=0o750),
        E("etc/old/.wh..wh..opq"),
        E("etc/old/c.txt", data=b"c"),
        E("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n"),
    ]
    last = [
        E("var/lib/.wh.data"),
        E("usr/share/hello", data=b"hello from layer 3\n"),
    ]
    return Image(
        [Layer(tar_bytes(base), compressions[0]), Layer(tar_bytes(change), compressions[1]),
         Layer(tar_bytes(last), compressions[2])],
        config={"User": "1000", "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"],
                "Env": ["PATH=/bin:/usr/bin"], "WorkingDir": "/tmp", "StopSignal": "SIGINT",
                "ExposedPorts": {"80/tcp": {}}, "Labels": {"test": "busybox"}},
    )


def small_image(text: str, arch: str = "amd64", user: str = "") -> Image:
    return Image([Layer(tar_bytes([E("hello.txt", data=text.encode())]), "gzip")],
                 config={"User": user} if user else {}, architecture=arch)


@dataclass
class Pushed:
    registry: Registry
    busybox: Image
    busybox_digest: str
    multi: list[Image]
    multi_digest: str

    def ref(self, repo_and_tag: str) -> str:
        return f"{self.registry.host}/{repo_and_tag}"


@pytest.fixture(scope="session")
async def pushed(registry: Registry) -> Pushed:
    """Images pushed once per session to the open registry."""
    busybox = busybox_image()
    multi = [small_image("amd64 world\n", "amd64", "nobody"),
             small_image("arm64 world\n", "arm64")]
    async with aiohttp.ClientSession() as session:
        push = Pusher(session, registry.base)
        digest = await push.image("test/busybox", "v1", busybox)
        multi_digest = await push.index("test/multi", "latest", multi)
    return Pushed(registry, busybox, digest, multi, multi_digest)


def busybox_full_image() -> Image:
    """A runnable busybox image: every applet linked in /bin, users root, app (1000) and
    nobody, for containers in real micro-VMs."""
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    entries = [
        E("bin", "dir", mode=0o755),
        E("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
        *(E(f"bin/{name}", "sym", link="busybox") for name in applets if name != "busybox"),
        E("etc", "dir", mode=0o755),
        E("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                             b"app:x:1000:1000:app:/home/app:/bin/sh\n"
                             b"nobody:x:65534:65534:nobody:/:/bin/false\n"),
        E("etc/group", data=b"root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"),
        E("home", "dir", mode=0o755),
        E("home/app", "dir", mode=0o755, uid=1000, gid=1000),
        E("root", "dir", mode=0o700),
        E("tmp", "dir", mode=0o1777),
        E("proc", "dir", mode=0o555),
        E("sys", "dir", mode=0o555),
        E("dev", "dir", mode=0o755),
        E("var", "dir", mode=0o755),
    ]
    return Image([Layer(tar_bytes(entries), "gzip")],
                 config={"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"})


@pytest.fixture(scope="session")
async def busybox_ref(registry: Registry) -> str:
    """A runnable busybox image pushed to the open registry; its reference."""
    async with aiohttp.ClientSession() as session:
        await Pusher(session, registry.base).image("e2e/busybox", "latest", busybox_full_image())
    return f"{registry.host}/e2e/busybox:latest"
