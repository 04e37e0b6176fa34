"""Image references: parsing and normalisation the way containerd and kubelet do it.

`busybox` means `docker.io/library/busybox:latest`; `index.docker.io` is an alias of `docker.io`;
a first component with a dot, a colon or `localhost` names a registry host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from criserver.errors import InvalidArgument

DOCKER_DOMAIN = "docker.io"
_DOCKER_ALIASES = {"index.docker.io", "registry-1.docker.io"}
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(
    r"^(?:localhost|\[[0-9a-fA-F:]+\]|"
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)"
    r"(?::[0-9]+)?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_ID = re.compile(r"^(?:sha256:)?([a-f0-9]{64})$")


@dataclass(frozen=True)
class Reference:
    """A normalised reference; `tag` is "latest" when neither tag nor digest was given."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def tagged(self) -> str:
        """`name:tag`, the form kept in an image's repo_tags ("" without a tag)."""
        return f"{self.name}:{self.tag}" if self.tag else ""

    def with_digest(self, digest: str) -> str:
        """`name@digest`, the form kept in an image's repo_digests."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse(text: str) -> Reference:
    """Parse and normalise `text`.

    :raises InvalidArgument: not a valid reference (also for upper case repository names).
    """
    if not text or len(text) > 4096:
        raise InvalidArgument(f"invalid image reference {text!r}")
    remainder, digest = text, ""
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"invalid image reference {text!r}: bad or unsupported digest")
    tag = ""
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid image reference {text!r}: bad tag {tag!r}")
    domain, path = _split_domain(remainder)
    if not domain or not _DOMAIN.match(domain):
        raise InvalidArgument(f"invalid image reference {text!r}: bad registry {domain!r}")
    components = path.split("/")
    if not path or not all(_COMPONENT.match(c) for c in components):
        raise InvalidArgument(
            f"invalid image reference {text!r}: repository name must be lower case "
            "components separated by '/'"
        )
    if len(domain) + 1 + len(path) > 255:
        raise InvalidArgument(f"invalid image reference {text!r}: name longer than 255")
    if not tag and not digest:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"):
        domain, path = DOCKER_DOMAIN, name
    else:
        domain, path = first, rest
    if domain in _DOCKER_ALIASES:
        domain = DOCKER_DOMAIN
    if domain == DOCKER_DOMAIN and "/" not in path:
        path = f"library/{path}"
    return domain, path


def parse_image_id(text: str) -> str | None:
    """`sha256:<hex>` for a full image id given with or without its `sha256:` prefix, else None."""
    match = _ID.match(text)
    return f"sha256:{match.group(1)}" if match else None


def is_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))
