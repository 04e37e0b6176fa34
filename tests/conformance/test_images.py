"""The critest images (images.py): the same digests on every build, the files and config each
of critest's specs relies on, their programs running on this host, and a push to the real
registry read back."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import aiohttp
import pytest

from tests.conformance import images
from tests.image.oci import OCI_MANIFEST, Image, sha
from tests.registry import Registry

EXPECTED_REFS = {
    "e2e-test-images/busybox:1.29-2", "e2e-test-images/nginx:1.14-2",
    "e2e-test-images/httpd:2.4.39-4", "e2e-test-images/nonewprivs:1.3", "pause:3.9",
    "k8s-staging-cri-tools/hostnet-nginx-amd64:latest",
    *(f"k8s-staging-cri-tools/test-image-{n}:latest" for n in ("1", "2", "3", "latest", "digest")),
    *(f"k8s-staging-cri-tools/test-image-tags:{t}" for t in ("1", "2", "3")),
    "k8s-staging-cri-tools/test-image-tag:test", "k8s-staging-cri-tools/test-image-tag:all",
    *(f"k8s-staging-cri-tools/test-image-user-{n}:latest"
      for n in ("uid", "username", "uid-group", "username-group")),
    "k8s-staging-cri-tools/test-image-predefined-group:latest",
}


def require_assets() -> None:
    missing = images.missing_assets()
    if missing:
        message = f"{', '.join(map(str, missing))} missing: {images.BUILD_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI builds them: missing is a failure there
        pytest.skip(message)


@pytest.fixture(scope="module")
def built() -> dict[str, Image]:
    require_assets()
    return images.build_all()


def flatten(image: Image) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """The image's files by path, later layers over earlier ones (no whiteouts are used)."""
    files: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    for layer in image.layers:
        with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
            for info in tar.getmembers():
                data = tar.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
                files[info.name] = (info, data)
    return files


def text(files: dict[str, tuple[tarfile.TarInfo, bytes]], name: str) -> str:
    return files[name][1].decode()


def test_every_reference_critest_pulls(built: dict[str, Image]) -> None:
    assert set(built) == EXPECTED_REFS


def test_digests_are_the_same_on_every_build(built: dict[str, Image]) -> None:
    again = images.build_all()
    assert {ref: sha(im.manifest_bytes()) for ref, im in again.items()} == \
        {ref: sha(im.manifest_bytes()) for ref, im in built.items()}


def test_one_busybox_layer_shared(built: dict[str, Image]) -> None:
    bases = {im.layers[0].descriptor()["digest"] for ref, im in built.items() if ref != "pause:3.9"}
    assert len(bases) == 1
    assert len(built["pause:3.9"].layers) == 1


def test_tags_of_one_image_share_its_digest(built: dict[str, Image]) -> None:
    def digest(ref: str) -> str:
        return sha(built[f"k8s-staging-cri-tools/{ref}"].manifest_bytes())

    assert digest("test-image-tags:1") == digest("test-image-tags:2") == digest("test-image-tags:3")
    assert digest("test-image-tag:test") == digest("test-image-tag:all")
    assert len({digest(f"test-image-{n}:latest") for n in ("1", "2", "3", "latest", "digest")}) == 5


def test_busybox(built: dict[str, Image]) -> None:
    image = built["e2e-test-images/busybox:1.29-2"]
    files = flatten(image)
    assert files["bin/busybox"][0].mode == 0o755
    # The applets critest's specs run, and a few more.
    for applet in ("sh", "pgrep", "ipcs", "adduser", "brctl", "top", "pidof", "id", "sleep",
                   "httpd", "wget", "ip", "mount", "hostname", "ping", "netstat", "grep",
                   "chmod", "touch", "mkdir", "cat", "ls", "echo"):
        info = files[f"bin/{applet}"][0]
        assert info.islnk() and info.linkname == "bin/busybox", applet
    assert "www-data:x:33:33:" in text(files, "etc/passwd")
    assert "www-data:x:33:" in text(files, "etc/group")
    assert text(files, "etc/shadow").startswith("root:*:")
    assert files["tmp"][0].mode == 0o1777
    assert image.config["Cmd"] == ["sh"]
    assert image.config["Env"][0].startswith("PATH=")


def test_test_images(built: dict[str, Image]) -> None:
    staging = "k8s-staging-cri-tools"
    for name in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest",
                 "test-image-digest"):
        files = flatten(built[f"{staging}/{name}:latest"])
        assert files[name][0].isfile() and files[name][0].size == 0
        assert "bin/sh" in files
    assert "same-image" in flatten(built[f"{staging}/test-image-tags:1"])
    assert "test-image-tag" in flatten(built[f"{staging}/test-image-tag:test"])
    users = {"uid": "1002", "username": "www-data", "uid-group": "1003:1004",
             "username-group": "www-data:1004"}
    for name, user in users.items():
        assert built[f"{staging}/test-image-user-{name}:latest"].config["User"] == user


def test_predefined_group(built: dict[str, Image]) -> None:
    image = built["k8s-staging-cri-tools/test-image-predefined-group:latest"]
    files = flatten(image)
    assert image.config["User"] == "1000"
    assert "\ndefault-user:x:1000:1000:" in text(files, "etc/passwd")
    group = text(files, "etc/group").splitlines()
    assert "default-user:x:1000:" in group
    assert "group-defined-in-image:x:50000:default-user" in group
    assert "\ndefault-user:!:" in text(files, "etc/shadow")
    home = files["home/default-user"][0]
    assert home.isdir() and (home.uid, home.gid) == (1000, 1000)


def test_nginx(built: dict[str, Image]) -> None:
    for ref, port in (("e2e-test-images/nginx:1.14-2", 80),
                      ("k8s-staging-cri-tools/hostnet-nginx-amd64:latest", 12003)):
        image = built[ref]
        files = flatten(image)
        assert files["usr/sbin/nginx"][0].mode == 0o755
        loader = files["lib64/ld-linux-x86-64.so.2"][0]
        assert loader.issym() and loader.linkname == "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        assert files["lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"][0].mode == 0o755
        assert "lib/x86_64-linux-gnu/libc.so.6" in files
        conf = text(files, "etc/nginx/nginx.conf")
        assert "pid        /var/run/nginx.pid;" in conf
        assert "include /etc/nginx/conf.d/*.conf;" in conf
        assert f"listen       {port};" in text(files, "etc/nginx/conf.d/default.conf")
        assert "etc/nginx/mime.types" in files
        assert "usr/share/nginx/html/index.html" in files
        assert files["var/run"][0].isdir() and files["var/lib/nginx"][0].isdir()
        assert files["var/log/nginx/error.log"][0].linkname == "/dev/stderr"
        assert "\nnginx:x:101:101:" in text(files, "etc/passwd")
        assert image.config["Cmd"] == ["nginx", "-g", "daemon off;"]
        assert "bin/sh" in files  # critest execs sh, cat and pidof in it


def test_httpd(built: dict[str, Image]) -> None:
    image = built["e2e-test-images/httpd:2.4.39-4"]
    files = flatten(image)
    assert image.config["StopSignal"] == "SIGWINCH"
    assert image.config["Cmd"] == ["httpd-foreground"]
    assert files["usr/local/apache2/bin/httpd-foreground"][0].mode == 0o755
    assert "usr/local/apache2/htdocs/index.html" in files


def test_nonewprivs_and_pause(built: dict[str, Image]) -> None:
    nnp = flatten(built["e2e-test-images/nonewprivs:1.3"])["usr/local/bin/nnp"][0]
    assert (nnp.mode, nnp.uid, nnp.gid) == (0o4755, 0, 0)
    assert built["e2e-test-images/nonewprivs:1.3"].config["Entrypoint"] == ["/usr/local/bin/nnp"]
    pause = built["pause:3.9"]
    assert flatten(pause)["pause"][0].mode == 0o755
    assert pause.config["Entrypoint"] == ["/pause"]


def test_programs_run_on_this_host() -> None:
    require_assets()
    paths = images.asset_paths()
    for applet in ("pgrep", "ipcs", "brctl", "adduser", "ping", "netstat"):
        run = subprocess.run([str(paths["busybox"]), applet, "--help"], capture_output=True,
                             text=True, check=False)
        assert "applet not found" not in run.stderr and f"Usage: {applet}" in run.stderr, applet
    ipcs = subprocess.run([str(paths["busybox"]), "ipcs"], capture_output=True, text=True,
                          check=True)
    assert "Shared Memory Segments" in ipcs.stdout
    nnp = subprocess.run([str(paths["nnp"])], capture_output=True, text=True, check=True)
    assert nnp.stdout == f"Effective uid: {os.geteuid()}\n"
    root = paths["nginx"].parents[2]
    version = subprocess.run(
        [str(root / "lib64/ld-linux-x86-64.so.2"), "--library-path",
         str(root / "lib/x86_64-linux-gnu"), str(paths["nginx"]), "-v"],
        capture_output=True, text=True, check=True)
    assert version.stderr.startswith("nginx version: nginx/")


def unpack(image: Image, dest: Path) -> Path:
    root = dest / "root"
    root.mkdir(0o755)  # as a container's root: other users (nginx's workers) traverse it
    for layer in image.layers:
        with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
            tar.extractall(root, filter="fully_trusted")
    return root


def in_root(image: Image, root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` run by the image's sh in `root`, with the image's environment, in new mount, pid
    and network namespaces, the host's /dev and a fresh /proc: roughly the container, no VM."""
    outer = (f"mount --rbind /dev {root}/dev && mount -t proc proc {root}/proc && "
             f"exec chroot {root} /bin/env -i {' '.join(image.config['Env'])} /bin/sh -c \"$0\"")
    return subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "sh", "-c", outer,
                           script], capture_output=True, text=True, timeout=60, check=False)


# Waits at most 10 s for a condition inside the root.
UNTIL = "n=0; until {}; do n=$((n+1)); [ $n -lt 100 ] || exit 9; sleep 0.1; done; "


@pytest.fixture
def root_ok() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to run an image in namespaces")


@pytest.mark.usefixtures("root_ok")
def test_nginx_serves_in_a_root(built: dict[str, Image], tmp_path: Path) -> None:
    """As critest's specs use it: pid file, master process title, a 200 on port 80."""
    image = built["e2e-test-images/nginx:1.14-2"]
    run = in_root(image, unpack(image, tmp_path), (
        "ip link set lo up; nginx -g 'daemon off;' & "
        + UNTIL.format("[ -s /var/run/nginx.pid ]") +
        "pid=$(cat /var/run/nginx.pid); echo pid=$pid; tr '\\0' ' ' </proc/$pid/cmdline; echo; "
        "cat /proc/$pid/comm; pidof nginx; wget -q -O - http://127.0.0.1:80/ && echo fetched"))
    assert run.returncode == 0, run.stderr
    assert "nginx: master process nginx -g daemon off;" in run.stdout
    assert "\nnginx\n" in run.stdout and "Welcome to nginx!" in run.stdout, run.stdout


@pytest.mark.usefixtures("root_ok")
def test_httpd_serves_and_stops_on_sigwinch(built: dict[str, Image], tmp_path: Path) -> None:
    image = built["e2e-test-images/httpd:2.4.39-4"]
    run = in_root(image, unpack(image, tmp_path), (
        "ip link set lo up; cd /usr/local/apache2; httpd-foreground & pid=$!; "
        + UNTIL.format("wget -q -O - http://127.0.0.1:80/") +
        "kill -WINCH $pid; wait $pid; echo stopped=$?"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("httpd: serving")
    assert "It works!" in run.stdout and "stopped=0" in run.stdout


@pytest.mark.usefixtures("root_ok")
def test_predefined_group_ids_in_a_root(built: dict[str, Image], tmp_path: Path) -> None:
    image = built["k8s-staging-cri-tools/test-image-predefined-group:latest"]
    run = in_root(image, unpack(image, tmp_path), "id default-user; id -G default-user")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1] == "1000 50000"


@pytest.mark.registry
async def test_push_all_to_the_registry(registry: Registry) -> None:
    require_assets()
    refs = await images.push_all(registry.base)
    assert set(refs) == EXPECTED_REFS
    expected = images.build_all()["e2e-test-images/nginx:1.14-2"]
    async with aiohttp.ClientSession() as session:
        url = f"{registry.base}/v2/e2e-test-images/nginx/manifests/1.14-2"
        async with session.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert resp.headers["Docker-Content-Digest"] == sha(expected.manifest_bytes())
        manifest = json.loads(body)
        assert [x["digest"] for x in manifest["layers"]] == \
            [x.descriptor()["digest"] for x in expected.layers]
        async with session.get(f"{registry.base}/v2/pause/tags/list") as resp:
            assert (await resp.json())["tags"] == ["3.9"]
