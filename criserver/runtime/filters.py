"""The List* filters of the CRI: id (or unique prefix), state, pod id and label selectors."""

from __future__ import annotations

import re
from collections.abc import Mapping

from criserver.errors import InvalidArgument

# Kubernetes label syntax: an optional DNS-subdomain prefix, then a name of at most 63 chars.
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")


def check_label_selector(selector: Mapping[str, str]) -> None:
    """:raises InvalidArgument: a key or value that no Kubernetes label can have."""
    for key, value in selector.items():
        if not _KEY.match(key):
            raise InvalidArgument(f"label selector key {key!r} is not a valid label key")
        if not _VALUE.match(value):
            raise InvalidArgument(f"label selector value {value!r} of {key!r} is not valid")


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
