"""The images critest (cri-tools v1.37.0) pulls, built offline from what build-assets.sh puts in
.cache/conformance (a full static busybox, Debian's nginx with its libraries, two tiny C programs)
and pushed to a test registry under their upstream repository paths, without the host.

Every tar entry has a fixed mtime and owner, so the layers, configs and manifests, and with them
the digests, are the same on every run (and on every machine with the same assets). All images
but pause start from the same busybox layer: the registry stores it once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import aiohttp

from tests.image.oci import E, Image, Layer, Pusher, tar_bytes

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / ".cache" / "conformance"
BUILD_HINT = "run `make conformance-assets` (tests/conformance/build-assets.sh)"
BUSYBOX_VERSION = "1.35.0"
MTIME = 1_600_000_000  # every entry's mtime: 2020-09-13
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STAGING = "k8s-staging-cri-tools"  # gcr.io/k8s-staging-cri-tools/...
E2E = "e2e-test-images"  # registry.k8s.io/e2e-test-images/...


class AssetsMissing(Exception):
    """build-assets.sh has not run (or not to completion) for this assets dir."""


def asset_paths(assets: Path = ASSETS) -> dict[str, Path]:
    return {
        "busybox": assets / f"busybox-{BUSYBOX_VERSION}" / "busybox",
        "nginx": assets / "nginx" / "root" / "usr" / "sbin" / "nginx",
        "pause": assets / "bin" / "pause",
        "nnp": assets / "bin" / "nnp",
    }


def missing_assets(assets: Path = ASSETS) -> list[Path]:
    return [path for path in asset_paths(assets).values() if not path.is_file()]


def check_assets(assets: Path = ASSETS) -> None:
    """:raises AssetsMissing: naming the missing files and how to build them."""
    missing = missing_assets(assets)
    if missing:
        names = ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p)
                          for p in missing)
        raise AssetsMissing(f"conformance image assets missing ({names}): {BUILD_HINT}")


# -- tar entries -------------------------------------------------------------------------------


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> E:
    return E(name, "dir", mode=mode, uid=uid, gid=gid, mtime=MTIME)


def f(name: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> E:
    raw = data.encode() if isinstance(data, str) else data
    return E(name, data=raw, mode=mode, uid=uid, gid=gid, mtime=MTIME)


def sym(name: str, target: str) -> E:
    return E(name, "sym", link=target, mode=0o777, mtime=MTIME)


def with_parents(entries: Iterable[E]) -> list[E]:
    """The entries in order, each preceded by the directories above it that no earlier entry
    made (0755 root): a layer's tar then never relies on implicit parents. A directory listed
    after such an implicit one replaces it in place."""
    made: dict[str, int] = {}  # directory -> its index in result
    result: list[E] = []
    for entry in entries:
        if entry.kind == "dir" and entry.name in made:
            result[made[entry.name]] = entry
            continue
        parts = entry.name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                made[parent] = len(result)
                result.append(d(parent))
        if entry.kind == "dir":
            made[entry.name] = len(result)
        result.append(entry)
    return result


def layer(entries: Iterable[E]) -> Layer:
    return Layer(tar_bytes(with_parents(entries)), "gzip")


# -- /etc as in the busybox image ----------------------------------------------------------------

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nobody:x:65534:
"""
DAYS = MTIME // 86400  # shadow's "last change", in days
SHADOW = "".join(f"{line.split(':')[0]}:*:{DAYS}:0:99999:7:::\n" for line in PASSWD.splitlines())
NSSWITCH = """\
passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
"""


def etc_files(passwd: str = PASSWD, group: str = GROUP, shadow: str = SHADOW) -> list[E]:
    return [f("etc/passwd", passwd), f("etc/group", group), f("etc/shadow", shadow, 0o640)]


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(name for name in out.stdout.split() if name != "busybox")


def busybox_layer(assets: Path = ASSETS) -> Layer:
    """The busybox image's root: every applet a hard link of /bin/busybox, the image's users."""
    busybox = asset_paths(assets)["busybox"]
    return layer([
        d("bin"),
        f("bin/busybox", busybox.read_bytes(), 0o755),
        *(E(f"bin/{name}", "link", link="bin/busybox", mode=0o755, mtime=MTIME)
          for name in busybox_applets(busybox)),
        d("dev"), d("etc"), *etc_files(), f("etc/nsswitch.conf", NSSWITCH),
        d("home"), d("proc", 0o555), d("root", 0o700), d("sys", 0o555), d("tmp", 0o1777),
        d("usr"), d("usr/sbin"), d("var"), d("var/spool"), d("var/spool/mail"), d("var/www"),
    ])


# -- the images --------------------------------------------------------------------------------


def busybox_image(base: Layer, *extra: Layer, **config: object) -> Image:
    return Image([base, *extra], config={"Env": [PATH_ENV], "Cmd": ["sh"], **config})


def file_image(base: Layer, name: str) -> Image:
    """images/image-test: busybox plus `ADD ${TEST} ${TEST}`, an empty file named `name`."""
    return busybox_image(base, layer([f(name, b"")]))


def predefined_group_image(base: Layer) -> Image:
    """images/image-predefined-group: `adduser -u 1000 -D default-user`, `addgroup -g 50000
    group-defined-in-image`, `addgroup default-user group-defined-in-image`, USER 1000."""
    user = "default-user"
    passwd = PASSWD + f"{user}:x:1000:1000:Linux User,,,:/home/{user}:/bin/sh\n"
    group = GROUP + f"{user}:x:1000:\ngroup-defined-in-image:x:50000:{user}\n"
    shadow = SHADOW + f"{user}:!:{DAYS}:0:99999:7:::\n"
    return busybox_image(base, layer([
        d("etc"), *etc_files(passwd, group, shadow),
        d("home"), d(f"home/{user}", 0o755, 1000, 1000),
    ]), User="1000")


NGINX_CONF = """\
# nginx as in the nginx image: foreground (`-g "daemon off;"` in CMD), logs to the container's
# stdout and stderr through /var/log/nginx, the pid file critest's specs wait for.
user  nginx;
worker_processes  1;

error_log  /var/log/nginx/error.log notice;
pid        /var/run/nginx.pid;

events {
    worker_connections  1024;
}

http {
    include       /etc/nginx/mime.types;
    default_type  application/octet-stream;
    access_log    /var/log/nginx/access.log;
    sendfile      on;
    keepalive_timeout  65;
    include /etc/nginx/conf.d/*.conf;
}
"""


def nginx_default_conf(port: int) -> str:
    return f"""\
server {{
    listen       {port};
    server_name  localhost;

    location / {{
        root   /usr/share/nginx/html;
        index  index.html index.htm;
    }}

    error_page   500 502 503 504  /50x.html;
    location = /50x.html {{
        root   /usr/share/nginx/html;
    }}
}}
"""


INDEX_HTML = """\
<!DOCTYPE html>
<html>
<head><title>Welcome to nginx!</title></head>
<body><h1>Welcome to nginx!</h1></body>
</html>
"""
ERROR_HTML = """\
<!DOCTYPE html>
<html>
<head><title>Error</title></head>
<body><h1>An error occurred.</h1></body>
</html>
"""


def tree_entries(root: Path) -> list[E]:
    """The files and symlinks under `root`, sorted: root-owned, files 0755 or 0644."""
    entries = []
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries.append(sym(name, str(path.readlink())))
        elif path.is_file():
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            entries.append(f(name, path.read_bytes(), mode))
    return entries


def nginx_layer(assets: Path = ASSETS) -> Layer:
    """Debian's nginx binary, its loader and libraries, its config (port 80) and pages, an
    nginx user for the workers, and the directories it writes to."""
    nginx_user = ("nginx:x:101:101:nginx user:/nonexistent:/bin/false\n", "nginx:x:101:\n")
    return layer([
        *tree_entries(assets / "nginx" / "root"),
        f("etc/passwd", PASSWD + nginx_user[0]), f("etc/group", GROUP + nginx_user[1]),
        f("etc/nginx/nginx.conf", NGINX_CONF),
        f("etc/nginx/conf.d/default.conf", nginx_default_conf(80)),
        f("usr/share/nginx/html/index.html", INDEX_HTML),
        f("usr/share/nginx/html/50x.html", ERROR_HTML),
        d("var/cache/nginx"), d("var/lib/nginx"), d("var/log/nginx"), d("var/run"),
        sym("var/log/nginx/access.log", "/dev/stdout"),
        sym("var/log/nginx/error.log", "/dev/stderr"),
    ])


def nginx_config(port: int) -> dict[str, object]:
    return {"Env": [PATH_ENV], "Cmd": ["nginx", "-g", "daemon off;"],
            "ExposedPorts": {f"{port}/tcp": {}}, "StopSignal": "SIGQUIT"}


HOSTNET_PORT = 12003  # images/hostnet-nginx/default.conf


def hostnet_nginx_image(base: Layer, nginx: Layer) -> Image:
    """images/hostnet-nginx: nginx with a default.conf listening on 12003."""
    conf = layer([f("etc/nginx/conf.d/default.conf", nginx_default_conf(HOSTNET_PORT))])
    return Image([base, nginx, conf], config=nginx_config(HOSTNET_PORT))


HTTPD_FOREGROUND = """\
#!/bin/sh
# Stands in for Apache's httpd-foreground: busybox httpd on port 80, logging to stderr. The
# image's StopSignal is Apache's graceful stop, SIGWINCH, which busybox httpd ignores: this
# shell turns it (and SIGTERM, SIGINT) into stopping the server.
echo "httpd: serving /usr/local/apache2/htdocs on port 80"
httpd -f -v -p 80 -h /usr/local/apache2/htdocs &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid; exit 0' WINCH TERM INT
wait $pid
"""


def httpd_image(base: Layer) -> Image:
    return busybox_image(base, layer([
        f("usr/local/apache2/bin/httpd-foreground", HTTPD_FOREGROUND, 0o755),
        f("usr/local/apache2/htdocs/index.html", "<html><body><h1>It works!</h1></body></html>\n"),
    ]), Env=[f"PATH=/usr/local/apache2/bin:{PATH_ENV[5:]}"], Cmd=["httpd-foreground"],
        WorkingDir="/usr/local/apache2", ExposedPorts={"80/tcp": {}}, StopSignal="SIGWINCH")


def nonewprivs_image(base: Layer, assets: Path = ASSETS) -> Image:
    """A set-uid-root program printing `Effective uid: N`."""
    nnp = asset_paths(assets)["nnp"].read_bytes()
    return Image([base, layer([f("usr/local/bin/nnp", nnp, 0o4755)])],
                 config={"Env": [PATH_ENV], "Entrypoint": ["/usr/local/bin/nnp"]})


def pause_image(assets: Path = ASSETS) -> Image:
    """As registry.k8s.io/pause: /pause alone, run as 65535."""
    pause = asset_paths(assets)["pause"].read_bytes()
    return Image([layer([f("pause", pause, 0o755)])],
                 config={"Env": [PATH_ENV], "Entrypoint": ["/pause"], "User": "65535:65535",
                         "WorkingDir": "/"})


def build_all(assets: Path = ASSETS) -> dict[str, Image]:
    """Every image critest pulls, by repository path and tag without the registry host
    ("e2e-test-images/busybox:1.29-2"); tags of one image map to the same Image.

    :raises AssetsMissing: when build-assets.sh has not built the assets
    """
    check_assets(assets)
    base = busybox_layer(assets)
    nginx = nginx_layer(assets)
    images: dict[str, Image] = {
        f"{E2E}/busybox:1.29-2": busybox_image(base),
        f"{E2E}/nginx:1.14-2": Image([base, nginx], config=nginx_config(80)),
        f"{E2E}/httpd:2.4.39-4": httpd_image(base),
        f"{E2E}/nonewprivs:1.3": nonewprivs_image(base, assets),
        # registry.k8s.io/pause:3.9 and k8s.gcr.io/pause:3.9 both land here through the mirrors.
        "pause:3.9": pause_image(assets),
        f"{STAGING}/hostnet-nginx-amd64:latest": hostnet_nginx_image(base, nginx),
    }
    for name in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest",
                 "test-image-digest"):
        images[f"{STAGING}/{name}:latest"] = file_image(base, name)
    same = file_image(base, "same-image")
    for tag in ("1", "2", "3"):
        images[f"{STAGING}/test-image-tags:{tag}"] = same
    tagged = file_image(base, "test-image-tag")
    for tag in ("test", "all"):
        images[f"{STAGING}/test-image-tag:{tag}"] = tagged
    for name, user in (("uid", "1002"), ("username", "www-data"), ("uid-group", "1003:1004"),
                       ("username-group", "www-data:1004")):
        images[f"{STAGING}/test-image-user-{name}:latest"] = busybox_image(base, User=user)
    images[f"{STAGING}/test-image-predefined-group:latest"] = predefined_group_image(base)
    return images


async def push_all(base_url: str, assets: Path = ASSETS,
                   authorization: str | None = None) -> list[str]:
    """Builds every image and pushes it to the registry at `base_url` ("http://127.0.0.1:PORT");
    returns the references pushed, as build_all's keys.

    :raises AssetsMissing: when build-assets.sh has not built the assets
    """
    images = build_all(assets)
    async with aiohttp.ClientSession() as session:
        pusher = Pusher(session, base_url, authorization)
        for ref, image in images.items():
            repo, tag = ref.rsplit(":", 1)
            await pusher.image(repo, tag, image)
    return list(images)


if __name__ == "__main__":  # python -m tests.conformance.images http://127.0.0.1:5000
    for pushed in asyncio.run(push_all(sys.argv[1])):
        print(pushed)
