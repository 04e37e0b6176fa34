"""criserver.logs: the daemon's own debug lines at debug, never the libraries' chatter."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from criserver import logs


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_libraries_debug_never_reaches_the_log(restored_logging: None, level: str) -> None:
    logs.setup(level)
    assert logging.getLogger("criserver.x").isEnabledFor(logging.getLevelName(level.upper()))
    for name in ("pyroute2.netlink.core", "qemu.qmp.protocol", "h2.connection", "grpclib.client"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(max(logging.WARNING,
                                                        logging.getLevelName(level.upper())))
