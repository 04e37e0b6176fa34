"""`criserver image pull|ls|rm|import`: image commands talking to the running daemon (`--os`:
the IronCore OS images IRI machines boot, which the CRI never lists)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import grpc

from criserver.api.admin.v1 import admin_pb2 as admin
from criserver.api.runtime.v1 import api_pb2 as cri


def add_parser(commands: Any) -> None:
    image = commands.add_parser("image", help="pull, list, remove and import images")
    image.add_argument("--endpoint", help="daemon socket (default: daemon.listen of the config)")
    sub = image.add_subparsers(dest="image_command", required=True)
    pull = sub.add_parser("pull", help="pull an image from its registry")
    pull.add_argument("reference")
    pull.add_argument("--username", default="")
    pull.add_argument("--password", default="", help="or set it on stdin with --password-stdin")
    pull.add_argument("--password-stdin", action="store_true")
    os_help = "IronCore OS images (what IRI machines boot) instead of container images"
    pull.add_argument("--os", action="store_true", help=os_help)
    ls = sub.add_parser("ls", help="list images")
    ls.add_argument("--os", action="store_true", help=os_help)
    rm = sub.add_parser("rm", help="remove images (by tag, id or digest)")
    rm.add_argument("references", nargs="+")
    rm.add_argument("--os", action="store_true", help=os_help)
    imp = sub.add_parser("import", help="import an OCI image layout directory or .tar archive")
    imp.add_argument("path")
    imp.add_argument("--name", default="", help="reference for an image the layout names not")


def run(args: argparse.Namespace, endpoint: str) -> int:
    channel = grpc.insecure_channel(endpoint.replace("unix://", "unix:", 1))
    try:
        command = {"pull": _pull, "ls": _ls, "rm": _rm, "import": _import}[args.image_command]
        return command(channel, args)
    except grpc.RpcError as exc:
        print(f"criserver image {args.image_command}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    finally:
        channel.close()


def _call(channel: grpc.Channel, path: str, request: Any, response: Any, stream: bool = False
          ) -> Any:
    factory = channel.unary_stream if stream else channel.unary_unary
    return factory(path, request_serializer=lambda m: m.SerializeToString(),
                   response_deserializer=response.FromString)(request)


def _pull(channel: grpc.Channel, args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else args.password
    progress: Iterator[admin.PullProgress] = _call(
        channel, "/criserver.admin.v1.Images/Pull",
        admin.PullRequest(image=args.reference, username=args.username, password=password,
                          os_image=args.os),
        admin.PullProgress, stream=True)
    display = _Progress(sys.stderr)
    for message in progress:
        if message.image_id:
            display.finish()
            print(message.image_id)
            return 0
        display.update(message.digest, message.done, message.total)
    print("criserver image pull: the daemon ended the pull without an image id", file=sys.stderr)
    return 1


class _Progress:
    """One bar per blob on a terminal; a line per blob when it completes otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.blobs: dict[str, tuple[int, int]] = {}

    def update(self, digest: str, done: int, total: int) -> None:
        previous = self.blobs.get(digest)
        self.blobs[digest] = (done, total)
        if not self.tty:
            if done == total and previous != (done, total):
                self.out.write(f"{_short(digest)}: done {_size(total)}\n")
            return
        if previous is not None:
            self.out.write(f"\x1b[{len(self.blobs)}A")  # back to the first bar
        elif len(self.blobs) > 1:
            self.out.write(f"\x1b[{len(self.blobs) - 1}A")
        for name, (d, t) in self.blobs.items():
            width = 30
            filled = width * d // t if t else width
            self.out.write(f"\r{_short(name)} [{'#' * filled}{'.' * (width - filled)}] "
                           f"{_size(d)}/{_size(t)}\x1b[K\n")
        self.out.flush()

    def finish(self) -> None:
        self.out.flush()


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _ls(channel: grpc.Channel, args: argparse.Namespace) -> int:
    if args.os:
        listed = _call(channel, "/criserver.admin.v1.Images/ListOsImages",
                       admin.ListOsImagesRequest(), admin.ListOsImagesResponse)
    else:
        listed = _call(channel, "/runtime.v1.ImageService/ListImages", cri.ListImagesRequest(),
                       cri.ListImagesResponse)
    rows = [("IMAGE", "ID", "SIZE", "USED BY" if args.os else "")]
    for image in listed.images:
        names = list(image.repo_tags) or list(image.repo_digests) or ["<none>"]
        users = ",".join(image.users) if args.os else ""
        for name in names:
            rows.append((name, image.id.split(":", 1)[-1][:12], _size(image.size), users))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _rm(channel: grpc.Channel, args: argparse.Namespace) -> int:
    for ref in args.references:
        if args.os:
            _call(channel, "/criserver.admin.v1.Images/RemoveOsImage",
                  admin.RemoveOsImageRequest(image=ref), admin.RemoveOsImageResponse)
        else:
            _call(channel, "/runtime.v1.ImageService/RemoveImage",
                  cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)),
                  cri.RemoveImageResponse)
        print(f"removed {ref}")
    return 0


def _import(channel: grpc.Channel, args: argparse.Namespace) -> int:
    import os

    response = _call(channel, "/criserver.admin.v1.Images/Import",
                     admin.ImportRequest(path=os.path.abspath(args.path), name=args.name),
                     admin.ImportResponse)
    for image_id in response.image_ids:
        print(image_id)
    return 0
