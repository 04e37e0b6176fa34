"""Registry credentials and the WWW-Authenticate challenge / bearer-token flow.

Credentials come from the CRI AuthConfig (username/password, base64 `auth`, identity token,
registry token). They never appear in logs, reprs or error messages.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from criserver.errors import InvalidArgument

_PARAM = re.compile(r'([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True)
class Credentials:
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def from_auth_config(cls, auth: Any) -> Credentials | None:
        """From a CRI `AuthConfig` (or None). The `auth` field is base64 of "user:password".

        :raises InvalidArgument: `auth` is not valid base64 of "user:password".
        """
        if auth is None:
            return None
        username, password = auth.username, auth.password
        if auth.auth:
            try:
                decoded = base64.b64decode(auth.auth, validate=True).decode()
            except ValueError:  # binascii.Error, UnicodeDecodeError, a str with non-ASCII
                raise InvalidArgument("auth config: 'auth' is not valid base64") from None
            if ":" not in decoded:
                raise InvalidArgument("auth config: 'auth' must encode 'username:password'")
            username, password = decoded.split(":", 1)
        creds = cls(username, password, auth.identity_token, auth.registry_token)
        return creds if creds else None

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token or self.registry_token)

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    @property
    def key(self) -> str:
        """An opaque cache key telling credential sets apart without revealing them."""
        text = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse `Bearer realm="...",service="...",scope="..."` (or `Basic realm=...`)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {}
    for match in _PARAM.finditer(rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return Challenge(scheme.lower(), params)
