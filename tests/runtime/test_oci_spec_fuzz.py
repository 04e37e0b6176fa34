"""Random pod and container configs through the OCI spec generator as both backends set it
up: a spec that serialises, or a deliberate CRI error; never another exception (which the
daemon answers INTERNAL). In-process: the daemon fuzz (test_cri_fuzz.py) sends random configs
to the inert backend only, which makes no spec."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from google.protobuf.message import Message
from hypothesis import event, given
from hypothesis import strategies as st

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.spec_policy import POLICY as MICROVM
from criserver.backends.runc.spec_policy import host_policy
from criserver.errors import CriError
from criserver.runtime import oci_spec, validate
from tests.runtime import test_cri_fuzz as fz

NS = oci_spec.PodNamespaces(ipc="/proc/7/ns/ipc", uts="/proc/7/ns/uts", pid="/proc/7/ns/pid")
POLICIES = {"microvm": MICROVM, "runc": host_policy(apparmor=False, selinux=False)}
IMAGE = oci_spec.ImageConfigView(user="", entrypoint=("/entry",), cmd=("cmd",),
                                 env=("PATH=/bin",), working_dir="/srv")


@pytest.fixture(scope="module", autouse=True)
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The strategies' pools: no daemon, so no live IDs."""
    fz.WORLD = fz.World(tmp_path_factory.mktemp("spec-fuzz"), "127.0.0.1:1", "busybox")
    try:
        yield
    finally:
        fz.WORLD = None


def _ours(message: Message, cls: type[Message]) -> Message:
    return cls.FromString(message.SerializeToString())


@fz.fuzz_settings(400)
@given(container=fz.messages(fz._descriptor("ContainerConfig")),
       pod=fz.messages(fz._descriptor("PodSandboxConfig")),
       policy=st.sampled_from(sorted(POLICIES)), valid_names=st.integers(0, 3).map(bool))
def test_random_configs_make_a_spec_or_a_cri_error(container: Message, pod: Message,
                                                   policy: str, valid_names: bool) -> None:
    c = _ours(container, cri.ContainerConfig)
    p = _ours(pod, cri.PodSandboxConfig)
    assert isinstance(c, cri.ContainerConfig) and isinstance(p, cri.PodSandboxConfig)
    if valid_names:  # past validation's first checks, into the generator
        c.metadata.name, c.image.image = "c", "busybox"
        p.metadata.name, p.metadata.namespace, p.metadata.uid = "p", "ns", "uid"
    try:
        validate.pod_config(p)
        validate.container_config(c)
        generated = oci_spec.generate(c, p, IMAGE, NS, lambda m: m.host_path,
                                      policy=POLICIES[policy], container_id="c1",
                                      sandbox_id="p1", image_name="busybox")
        json.dumps(generated.spec)
        event(f"{policy} spec")
    except CriError as exc:
        event(f"{policy} {type(exc).__name__}: {exc.message[:40]}")

