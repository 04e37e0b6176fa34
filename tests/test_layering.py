"""The layers import downwards only: the VM layer and the network know nothing of the CRI, the
runtime's records or the guest agent's protocol, so IRI machines and a host backend can use
them as they are."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> module prefixes it must not import
FORBIDDEN = {
    "criserver/vm": ("criserver.runtime", "criserver.store", "criserver.backends",
                     "criserver.api", "criserver.image", "criserver.machine", "vmagent"),
    "criserver/network": ("criserver.runtime", "criserver.store", "criserver.backends",
                          "criserver.api", "criserver.image", "criserver.vm", "vmagent"),
    "criserver/runtime": ("criserver.backends", "criserver.vm", "criserver.network",
                          "vmagent"),
}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(package: str) -> None:
    bad = [f"{path.relative_to(REPO)}: {name}"
           for path in sorted((REPO / package).rglob("*.py"))
           for name in sorted(imports_of(path))
           if name.startswith(FORBIDDEN[package])]
    assert bad == []
