"""Crashes the parser fuzzing found (tests/fuzz/), each pinned by the smallest input that showed
it: the parser now answers with its deliberate error. The inputs are also kept in the corpora
as `regress-*`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from criserver.config import ConfigError, load
from criserver.errors import InvalidArgument
from criserver.image import manifest as mf
from criserver.image import osboot
from criserver.network.cni import CniResult

DIGEST = "sha256:" + "a" * 64


def test_layer_media_type_that_is_not_a_string() -> None:
    # TypeError (unhashable list) in is_os_manifest, reached on every pulled manifest.
    doc = {"config": {"mediaType": "x", "digest": DIGEST, "size": 10},
           "layers": [{"mediaType": ["http://x"]}]}
    assert not osboot.is_os_manifest(doc)
    osboot.refuse_as_container(doc, "image x")


def test_json_nested_deeper_than_the_parser_goes() -> None:
    # RecursionError out of json.loads: a registry's manifest or a layout's index.
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        mf.parse_json(b'{"manifests": ' + b"[" * 50_000, "image x")


@pytest.mark.parametrize("result", [
    {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.2/24", "routes": [{"lst": "0.0.0.0/0"}]}},
    {"cniVersion": "0.2.0", "ip4": ["10.1.0.2/24"]},
    {"cniVersion": "1.0.0", "ips": [{"address": 5}]},
    {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": "0"}],
     "interfaces": [{"name": "eth0"}]},
    {"cniVersion": "1.0.0", "interfaces": [{"mac": "aa"}]},
])
def test_cni_results_of_the_wrong_shape(result: dict[str, object]) -> None:
    # KeyError, AttributeError or TypeError where CniResult.parse documents ValueError.
    with pytest.raises(ValueError, match=r"not a CNI result|does not appear"):
        CniResult.parse(json.loads(json.dumps(result)))


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    # UnicodeDecodeError out of config.load: the daemon stopped with a traceback, not the
    # message naming the file.
    path = tmp_path / "config.toml"
    path.write_bytes(b'[daemon]\nlog_level = "\x8c"\n')
    with pytest.raises(ConfigError, match=r"config\.toml"):
        load(path)
