"""criserver's CRI proto has the reference wire format, and its generated code is current."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from tests.cri_client import OWN_PROTO, REFERENCE_PROTO, REPO, compile_descriptor_set


def _shape(file: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    """Everything that decides the wire format and the RPC paths, nothing else."""
    shape: dict[str, Any] = {"package": file.package}

    def message(m: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}.{m.name}"
        shape[name] = sorted(
            (f.number, f.name, f.type, f.label, f.type_name,
             f.oneof_index if f.HasField("oneof_index") else -1, f.proto3_optional)
            for f in m.field
        )
        for nested in m.nested_type:
            message(nested, name)
        for e in m.enum_type:
            shape[f"{name}.{e.name}"] = sorted((v.number, v.name) for v in e.value)

    for m in file.message_type:
        message(m, "")
    for e in file.enum_type:
        shape[f".{e.name}"] = sorted((v.number, v.name) for v in e.value)
    for s in file.service:
        shape[f"service {s.name}"] = [
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in s.method
        ]
    return shape


@pytest.mark.skipif(not REFERENCE_PROTO.exists(), reason="reference CRI proto not present")
def test_wire_format_matches_reference() -> None:
    (own,) = compile_descriptor_set(OWN_PROTO).file
    (ref,) = compile_descriptor_set(REFERENCE_PROTO).file
    own_shape, ref_shape = _shape(own), _shape(ref)
    assert own_shape.keys() == ref_shape.keys()
    for key in ref_shape:
        assert own_shape[key] == ref_shape[key], key


def test_generated_code_is_current(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(REPO / "proto/generate.sh"), str(tmp_path)], check=True, env=env)
    generated = [p.relative_to(tmp_path) for p in tmp_path.rglob("*.py")]
    assert generated, "generate.sh produced nothing"
    for path in generated:
        assert filecmp.cmp(tmp_path / path, REPO / path, shallow=False), (
            f"{path} is stale: run `make proto` and commit the result"
        )
