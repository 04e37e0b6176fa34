"""An inert backend that claims every handler feature, to see features reported per handler."""

from __future__ import annotations

from criserver.runtime.backend import BackendFeatures
from tests.backends.inert import InertBackend


class FeaturedBackend(InertBackend):
    name = "featured"
    features = BackendFeatures(recursive_read_only_mounts=True, user_namespaces=True)


class StreamableBackend(InertBackend):
    """Inert, but declaring streaming: Exec/Attach/PortForward hand out URLs (sessions on them
    fail: nothing runs)."""

    name = "streamable"
    features = BackendFeatures(streaming=True)
