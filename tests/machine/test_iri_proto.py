"""criserver's IRI protos have the reference wire format (when the reference files are at hand)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.cri_client import REPO
from tests.test_proto import _shape

OWN_ROOT = REPO / "proto/iri"
REFERENCE_ROOT = Path(
    os.environ.get("IRI_REFERENCE_ROOT", REPO.parent / "shared/reference/iri")
)
FILES = ("meta/v1alpha1/api.proto", "event/v1alpha1/api.proto", "machine/v1alpha1/api.proto")


def compile_tree(root: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every file of FILES compiled with `root` as the proto root, by file name."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}",
             f"--descriptor_set_out={out}", *FILES],
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.name: f for f in files}


def test_own_protos_compile() -> None:
    own = compile_tree(OWN_ROOT)
    assert {f.package for f in own.values()} == {"meta.v1alpha1", "event.v1alpha1",
                                                   "machine.v1alpha1"}


@pytest.mark.skipif(not REFERENCE_ROOT.exists(),
                    reason=f"reference IRI protos not present at {REFERENCE_ROOT}")
@pytest.mark.parametrize("name", FILES)
def test_wire_format_matches_reference(name: str) -> None:
    own = _shape(compile_tree(OWN_ROOT)[name])
    ref = _shape(compile_tree(REFERENCE_ROOT)[name])
    assert own.keys() == ref.keys()
    for key in ref:
        assert own[key] == ref[key], key
    assert compile_tree(OWN_ROOT)[name].dependency == compile_tree(REFERENCE_ROOT)[name].dependency
