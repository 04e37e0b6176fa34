"""Reference normalisation (as containerd/kubelet do it), platform choice, auth parsing."""

from __future__ import annotations

import base64

import pytest

from criserver.api.runtime.v1 import api_pb2
from criserver.config import ImageConfig
from criserver.errors import FailedPrecondition, InvalidArgument
from criserver.image import manifest as mf
from criserver.image.auth import Credentials, parse_challenge
from criserver.image.reference import parse
from criserver.image.registry import RegistryClient
from tests.image.oci import OCI_CONFIG


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
    ("someone/app", "docker.io/someone/app:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
    ("quay.io/a/b@sha256:" + "a" * 64, "quay.io/a/b@sha256:" + "a" * 64),
    ("quay.io/a/b:t@sha256:" + "b" * 64, "quay.io/a/b:t@sha256:" + "b" * 64),
])
def test_normalisation(text: str, expected: str) -> None:
    assert str(parse(text)) == expected


@pytest.mark.parametrize("text", ["", "Busybox", "a//b", "busybox:", "x@sha256:abc",
                                  "busybox:bad tag", "-x/y"])
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse(text)


def _index(*platforms: tuple[str, str, str]) -> dict[str, object]:
    return {"manifests": [
        {"mediaType": mf.OCI_MANIFEST, "digest": f"sha256:{i:064x}", "size": 1,
         "platform": {"os": o, "architecture": a, **({"variant": v} if v else {})}}
        for i, (o, a, v) in enumerate(platforms)
    ]}


def test_platform_selection() -> None:
    idx = _index(("linux", "arm64", "v8"), ("linux", "amd64", "v3"), ("linux", "amd64", ""),
                 ("unknown", "unknown", ""))
    assert mf.select_platform(idx, mf.Platform(), "t").digest == f"sha256:{2:064x}"
    assert mf.select_platform(idx, mf.Platform(variant="v3"), "t").digest == f"sha256:{1:064x}"
    assert mf.select_platform(idx, mf.Platform("linux", "arm64", ""), "t").digest == \
        f"sha256:{0:064x}"
    with pytest.raises(FailedPrecondition, match="offered: linux/arm64/v8"):
        mf.select_platform(_index(("linux", "arm64", "v8")), mf.Platform(), "t")


def test_foreign_layers_refused() -> None:
    doc = {"config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "c" * 64, "size": 2},
           "layers": [{"mediaType": mf.FOREIGN_LAYER_TYPES[0], "digest": "sha256:" + "d" * 64,
                       "size": 5, "urls": ["https://example.com/layer"]}]}
    with pytest.raises(FailedPrecondition, match="foreign"):
        mf.parse_manifest(doc, "t")


def test_user_split() -> None:
    assert mf.uid_or_username("1000:1000") == (1000, "")
    assert mf.uid_or_username("nginx:nginx") == (None, "nginx")
    assert mf.uid_or_username("") == (None, "")


def test_auth_config_and_challenge() -> None:
    auth = api_pb2.AuthConfig(auth=base64.b64encode(b"u:p:w").decode())
    creds = Credentials.from_auth_config(auth)
    assert creds is not None and (creds.username, creds.password) == ("u", "p:w")
    assert "p:w" not in repr(creds) and "p:w" not in str(creds)
    assert Credentials.from_auth_config(api_pb2.AuthConfig()) is None
    with pytest.raises(InvalidArgument):
        Credentials.from_auth_config(api_pb2.AuthConfig(auth="!!"))
    with pytest.raises(InvalidArgument):  # found by the CRI fuzz test: INTERNAL before
        Credentials.from_auth_config(api_pb2.AuthConfig(auth="dTpw\u00e9"))
    c = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                        'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}


def test_endpoints_and_schemes() -> None:
    client = RegistryClient(ImageConfig(insecure_registries=["plain.local:5000"],
                                        mirrors={"docker.io": ["mirror.local",
                                                               "http://m2.local:81"]}))
    assert [str(e.url) for e in client.endpoints("docker.io")] == \
        ["https://mirror.local", "http://m2.local:81", "https://registry-1.docker.io"]
    assert [str(e.url) for e in client.endpoints("plain.local:5000")] == \
        ["http://plain.local:5000"]
    assert [str(e.url) for e in client.endpoints("localhost:5000")] == ["http://localhost:5000"]
    assert [str(e.url) for e in client.endpoints("[::1]:5000")] == ["http://[::1]:5000"]
    assert [str(e.url) for e in client.endpoints("quay.io")] == ["https://quay.io"]
