"""The runc backend's last step of a spec, on the host: the user resolved in the rootfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.runc.backend import _host_spec
from criserver.backends.runc.spec_policy import host_policy
from criserver.errors import InvalidArgument
from criserver.runtime import oci_spec


def _generated(**security: object) -> oci_spec.GeneratedSpec:
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="busybox"),
        command=["sleep", "1"], linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(**security)))  # type: ignore[arg-type]
    pod = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="p", namespace="n", uid="u"))
    return oci_spec.generate(
        container, pod, oci_spec.ImageConfigView(),
        oci_spec.PodNamespaces(ipc="", uts="", pid="/proc/7/ns/pid"),
        lambda m: m.host_path, policy=host_policy(apparmor=False, selinux=False),
        container_id="c1", sandbox_id="p1")


@pytest.mark.parametrize("security", [{"run_as_username": "ghost"},
                                      {"run_as_username": "nobody"}])
def test_a_user_the_image_lacks_is_invalid_argument(tmp_path: Path,
                                                    security: dict[str, object]) -> None:
    # Found by the CRI fuzz test: the agent's resolver raised a grpclib error, which the
    # daemon answered INTERNAL.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\n")
    with pytest.raises(InvalidArgument, match="not found in the image"):
        _host_spec(_generated(**security), tmp_path)
    spec = _host_spec(_generated(run_as_username="root"), tmp_path)
    assert spec["process"]["user"]["uid"] == 0
