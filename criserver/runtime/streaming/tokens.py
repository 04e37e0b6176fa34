"""Single-use tokens naming a prepared streaming request, as the URLs Exec/Attach/PortForward
return. A token expires after its TTL and at most `capacity` are outstanding, as in kubelet.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from criserver.errors import ResourceExhausted

T = TypeVar("T")

DEFAULT_TTL = 60.0
DEFAULT_CAPACITY = 1000
TOKEN_BYTES = 24  # 192 bits: a token is the only credential the URL carries


class TokenCache(Generic[T]):
    """Tokens to requests. Tokens are inserted in expiry order (one TTL for all), so expired
    ones are always at the front and eviction is O(1) per token."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        self._evict_expired()
        return len(self._entries)

    def insert(self, request: T) -> str:
        """Store `request` under a new random token.

        :raises ResourceExhausted: `capacity` unexpired tokens are outstanding.
        """
        self._evict_expired()
        if len(self._entries) >= self._capacity:
            raise ResourceExhausted(
                f"too many streaming requests outstanding ({self._capacity}): "
                "retry once some are used or expire"
            )
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._entries[token] = (self._clock() + self._ttl, request)
        return token

    def consume(self, token: str) -> T | None:
        """The request for `token`, removing it: a token works once, and not after expiry."""
        entry = self._entries.pop(token, None)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def _evict_expired(self) -> None:
        now = self._clock()
        while self._entries:
            token, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[token]
