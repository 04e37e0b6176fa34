"""OCI spec generation: table-driven checks of the spec, then real `runc run`s of generated specs.

The runc tests run on the host (root, runc, busybox-static): the same runc version as the guest
runs, so they prove runc accepts what we generate and that the settings take effect.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from criserver.api.runtime.v1 import api_pb2 as cri
from criserver.backends.microvm.spec_policy import POLICY as MICROVM
from criserver.errors import FailedPrecondition, InvalidArgument, Unimplemented
from criserver.image.manifest import ImageConfigInfo
from criserver.runtime import oci_spec
from criserver.runtime.oci_spec import (
    ALL_CAPS,
    DEFAULT_CAPS,
    DEFAULT_MASKED_PATHS,
    DEFAULT_READONLY_PATHS,
    GeneratedSpec,
    ImageConfigView,
    PodNamespaces,
    SpecPolicy,
    generate,
    generate_async,
)

NS = PodNamespaces(ipc="/proc/7/ns/ipc", uts="/proc/7/ns/uts", pid="/proc/7/ns/pid")
SHARED = "/run/criserver/shared"
IMAGE = ImageConfigView(
    user="", entrypoint=("/entry",), cmd=("default-cmd",),
    env=("PATH=/image/bin", "LANG=C.UTF-8", "FOO=image"), working_dir="/srv",
)


def guest(mount: cri.Mount) -> str:
    return SHARED + mount.host_path


def pod_config(**kw: Any) -> cri.PodSandboxConfig:
    base = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", namespace="default", uid="pod-uid"),
        hostname="web-host",
    )
    base.MergeFrom(cri.PodSandboxConfig(**kw))
    return base


def container_config(sc: dict[str, Any] | None = None, **kw: Any) -> cri.ContainerConfig:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"), image=cri.ImageSpec(image="busybox:1.36"),
        **kw,
    )
    if sc is not None:
        config.linux.security_context.CopyFrom(cri.LinuxContainerSecurityContext(**sc))
    return config


def gen(
    container: cri.ContainerConfig | None = None,
    pod: cri.PodSandboxConfig | None = None,
    image: ImageConfigView | None = IMAGE,
    ns: PodNamespaces = NS,
    **kw: Any,
) -> GeneratedSpec:
    return generate(
        container or container_config(), pod or pod_config(), image, ns, guest,
        policy=kw.pop("policy", MICROVM), container_id=kw.pop("container_id", "c1"),
        sandbox_id=kw.pop("sandbox_id", "p1"), **kw,
    )


def spec_of(**sc: Any) -> dict[str, Any]:
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(privileged=True)))
    return gen(container_config(sc), pod).spec


def mount_at(spec: dict[str, Any], destination: str) -> dict[str, Any]:
    (found,) = [m for m in spec["mounts"] if m["destination"] == destination]
    return found


# --- process: args, env, cwd, terminal ------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "expected"),
    [
        (["cmd"], ["a1"], ["/entry"], ["c1"], ["cmd", "a1"]),  # command drops the image's cmd
        (["cmd"], [], ["/entry"], ["c1"], ["cmd"]),
        ([], ["a1", "a2"], ["/entry"], ["c1"], ["/entry", "a1", "a2"]),  # args replace cmd
        ([], [], ["/entry"], ["c1"], ["/entry", "c1"]),
        ([], [], [], ["c1", "x"], ["c1", "x"]),
        ([], ["a1"], [], ["c1"], ["a1"]),
        ([], [], ["/entry"], [], ["/entry"]),
    ],
)
def test_process_args(
    command: list[str], args: list[str], entrypoint: list[str], cmd: list[str],
    expected: list[str],
) -> None:
    image = ImageConfigView(entrypoint=tuple(entrypoint), cmd=tuple(cmd))
    spec = gen(container_config(command=command, args=args), image=image).spec
    assert spec["process"]["args"] == expected


def test_no_command_at_all_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        gen(container_config(), image=ImageConfigView())
    with pytest.raises(InvalidArgument):
        gen(container_config(), image=None)


def test_env_image_then_cri_override_by_name() -> None:
    container = container_config(envs=[
        cri.KeyValue(key="FOO", value=b"cri"), cri.KeyValue(key="NEW", value=b"a=b"),
        cri.KeyValue(key="EMPTY", value=b""), cri.KeyValue(key="UTF", value="é".encode()),
    ])
    env = gen(container).spec["process"]["env"]
    assert env == [
        "PATH=/image/bin", "HOSTNAME=web-host", "LANG=C.UTF-8", "FOO=cri", "NEW=a=b", "EMPTY=",
        "UTF=é",
    ]


@pytest.mark.parametrize("value", [b"\xff\xfe", b"a\0b"])
def test_env_value_not_text_is_invalid(value: bytes) -> None:
    with pytest.raises(InvalidArgument, match="env"):
        gen(container_config(envs=[cri.KeyValue(key="K", value=value)]))


def test_env_default_path_without_image_env() -> None:
    env = gen(image=ImageConfigView(cmd=("x",))).spec["process"]["env"]
    assert env[0] == oci_spec.DEFAULT_PATH_ENV
    assert "HOSTNAME=web-host" in env


@pytest.mark.parametrize(
    ("cri_dir", "image_dir", "expected"),
    [("/work", "/srv", "/work"), ("", "/srv", "/srv"), ("", "", "/")],
)
def test_cwd(cri_dir: str, image_dir: str, expected: str) -> None:
    image = ImageConfigView(cmd=("x",), working_dir=image_dir)
    spec = gen(container_config(working_dir=cri_dir), image=image).spec
    assert spec["process"]["cwd"] == expected


@pytest.mark.parametrize("tty", [True, False])
def test_terminal(tty: bool) -> None:
    assert gen(container_config(tty=tty)).spec["process"]["terminal"] is tty


def test_hostname_and_root() -> None:
    spec = gen().spec
    assert spec["hostname"] == "web-host"
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert spec["ociVersion"].startswith("1.0")


# --- user -----------------------------------------------------------------------------------


@dataclass
class UserCase:
    image_user: str
    sc: dict[str, Any]
    uid: int
    gid: int
    username: str = ""
    groupname: str = ""
    gid_from_passwd: bool = False


USER_CASES = [
    UserCase("", {}, 0, 0, gid_from_passwd=True),
    UserCase("1000", {}, 1000, 0, gid_from_passwd=True),
    UserCase("1000:2000", {}, 1000, 2000),
    UserCase("nobody", {}, 0, 0, username="nobody", gid_from_passwd=True),
    UserCase("www-data:adm", {}, 0, 0, username="www-data", groupname="adm"),
    UserCase("app:50", {}, 0, 50, username="app"),
    UserCase("10:staff", {}, 10, 0, groupname="staff"),
    # CRI fields win over the image's user (critest RunAsUser / RunAsUserName / RunAsGroup).
    UserCase("nobody", {"run_as_user": cri.Int64Value(value=1001)}, 1001, 0,
             gid_from_passwd=True),
    UserCase("1000", {"run_as_username": "nobody"}, 0, 0, username="nobody",
             gid_from_passwd=True),
    UserCase("", {"run_as_user": cri.Int64Value(value=1001),
                  "run_as_group": cri.Int64Value(value=1002)}, 1001, 1002),
    UserCase("a:b", {"run_as_username": "nobody", "run_as_group": cri.Int64Value(value=7)},
             0, 7, username="nobody"),
    UserCase("", {"run_as_user": cri.Int64Value(value=0)}, 0, 0, gid_from_passwd=True),
]


@pytest.mark.parametrize("case", USER_CASES, ids=lambda c: f"{c.image_user}-{sorted(c.sc)}")
def test_user(case: UserCase) -> None:
    image = ImageConfigView(user=case.image_user, cmd=("x",))
    out = gen(container_config(case.sc), image=image)
    assert out.spec["process"]["user"] == {"uid": case.uid, "gid": case.gid}
    assert (out.username, out.groupname, out.gid_from_passwd) == (
        case.username, case.groupname, case.gid_from_passwd)


@pytest.mark.parametrize(
    ("image_user", "sc", "match"),
    [
        ("", {"run_as_group": cri.Int64Value(value=1002)}, "run_as_group"),  # critest
        ("", {"run_as_user": cri.Int64Value(value=1), "run_as_username": "x"}, "exclusive"),
        ("", {"run_as_user": cri.Int64Value(value=-1)}, "run_as_user"),
        ("", {"run_as_user": cri.Int64Value(value=2**32)}, "run_as_user"),
        ("", {"run_as_username": "bad name"}, "run_as_username"),
        ("", {"run_as_username": "a/b"}, "run_as_username"),
        ("a:b:c", {}, "user"),
        (":100", {}, "user"),
        ("100:", {}, "user"),
        ("99999999999", {}, "uid"),
        ("x y", {}, "image user"),
        ("", {"run_as_user": cri.Int64Value(value=1), "supplemental_groups": [-5]}, "group"),
    ],
)
def test_user_invalid(image_user: str, sc: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        gen(container_config(sc), image=ImageConfigView(user=image_user, cmd=("x",)))


def test_supplemental_groups_and_policy() -> None:
    sc = {"run_as_user": cri.Int64Value(value=1000), "supplemental_groups": [1234, 5678, 1234]}
    merged = gen(container_config(sc))
    assert merged.spec["process"]["user"]["additionalGids"] == [1234, 5678]
    assert merged.merge_image_groups is True  # Merge is the default
    strict = gen(container_config({**sc, "supplemental_groups_policy": cri.Strict}))
    assert strict.merge_image_groups is False
    assert "additionalGids" not in gen().spec["process"]["user"]


# --- capabilities ---------------------------------------------------------------------------


def caps(**capability: list[str]) -> dict[str, list[str]]:
    spec = gen(container_config({"capabilities": cri.Capability(**capability)})).spec
    result: dict[str, list[str]] = spec["process"]["capabilities"]
    return result


def by_number(names: set[str]) -> list[str]:
    return sorted(names, key=ALL_CAPS.index)


@pytest.mark.parametrize(
    ("capability", "bounding"),
    [
        ({}, set(DEFAULT_CAPS)),
        ({"add_capabilities": ["NET_ADMIN"]}, {*DEFAULT_CAPS, "CAP_NET_ADMIN"}),  # critest
        ({"add_capabilities": ["CAP_SYS_ADMIN"]}, {*DEFAULT_CAPS, "CAP_SYS_ADMIN"}),
        ({"add_capabilities": ["sys_time"]}, {*DEFAULT_CAPS, "CAP_SYS_TIME"}),
        ({"drop_capabilities": ["NET_RAW"]}, set(DEFAULT_CAPS) - {"CAP_NET_RAW"}),  # critest
        ({"drop_capabilities": ["cap_chown", "KILL"]},
         set(DEFAULT_CAPS) - {"CAP_CHOWN", "CAP_KILL"}),
        ({"add_capabilities": ["ALL"]}, set(ALL_CAPS)),  # critest
        ({"drop_capabilities": ["ALL"]}, set()),  # critest
        ({"add_capabilities": ["ALL"], "drop_capabilities": ["CHOWN"]},
         set(ALL_CAPS) - {"CAP_CHOWN"}),
        ({"add_capabilities": ["CHOWN"], "drop_capabilities": ["ALL"]}, {"CAP_CHOWN"}),
        ({"add_capabilities": ["NET_ADMIN"], "drop_capabilities": ["NET_ADMIN"]},
         set(DEFAULT_CAPS)),
    ],
)
def test_capabilities_bounding(capability: dict[str, list[str]], bounding: set[str]) -> None:
    got = caps(**capability)
    assert got["bounding"] == by_number(bounding)
    assert got["effective"] == got["permitted"] == got["bounding"]
    assert got["ambient"] == []


def test_capabilities_inheritable_and_ambient() -> None:
    assert caps()["inheritable"] == []  # defaults stay out of it (CVE-2022-24769)
    added = caps(add_capabilities=["NET_ADMIN"])
    assert added["inheritable"] == ["CAP_NET_ADMIN"]
    ambient = caps(add_ambient_capabilities=["NET_BIND_SERVICE", "CAP_SYS_TIME"])
    assert ambient["ambient"] == ["CAP_NET_BIND_SERVICE", "CAP_SYS_TIME"]
    assert ambient["inheritable"] == ambient["ambient"]
    assert "CAP_SYS_TIME" in ambient["bounding"] and "CAP_SYS_TIME" in ambient["permitted"]
    dropped = caps(add_ambient_capabilities=["SYS_TIME"], drop_capabilities=["SYS_TIME"])
    assert "CAP_SYS_TIME" not in dropped["bounding"] + dropped["ambient"]


@pytest.mark.parametrize(
    "capability",
    [{"add_capabilities": ["NET_FOO"]}, {"drop_capabilities": ["CAP_BOGUS"]},
     {"add_ambient_capabilities": ["nope"]}],
)
def test_unknown_capability_is_invalid(capability: dict[str, list[str]]) -> None:
    with pytest.raises(InvalidArgument, match="unknown capability"):
        caps(**capability)


# --- privileged, read-only rootfs, no_new_privs, masked/readonly paths ------------------------


def test_privileged() -> None:
    caplog_spec = spec_of(
        privileged=True, capabilities=cri.Capability(drop_capabilities=["ALL"]),
        seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault),
        masked_paths=["/x"], readonly_paths=["/y"],
    )
    process = caplog_spec["process"]
    assert process["capabilities"]["bounding"] == list(ALL_CAPS)
    linux = caplog_spec["linux"]
    assert "seccomp" not in linux
    assert "maskedPaths" not in linux and "readonlyPaths" not in linux
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "rw" in mount_at(caplog_spec, "/sys")["options"]
    assert "rw" in mount_at(caplog_spec, "/sys/fs/cgroup")["options"]
    assert {"type": "cgroup"} not in linux["namespaces"]
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(privileged=True)))
    assert gen(container_config({"privileged": True}), pod).guest_devices is True


def test_not_privileged_defaults() -> None:
    out = gen()
    linux = out.spec["linux"]
    assert out.guest_devices is False
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert linux["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    assert linux["readonlyPaths"] == list(DEFAULT_READONLY_PATHS)
    assert "ro" in mount_at(out.spec, "/sys")["options"]
    assert "ro" in mount_at(out.spec, "/sys/fs/cgroup")["options"]
    assert "seccomp" not in linux  # no profile given: unconfined, as critest expects
    assert out.spec["process"]["noNewPrivileges"] is False
    assert "rlimits" not in out.spec["process"]


def test_privileged_container_needs_privileged_pod() -> None:
    with pytest.raises(InvalidArgument, match="privileged"):
        gen(container_config({"privileged": True}))


def test_readonly_rootfs() -> None:
    spec = gen(container_config({"readonly_rootfs": True})).spec
    assert spec["root"]["readonly"] is True
    for dest in ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname"):
        assert "ro" in mount_at(spec, dest)["options"]
    assert "rw" in mount_at(spec, "/dev/shm")["options"]


def test_no_new_privs() -> None:
    assert gen(container_config({"no_new_privs": True})).spec["process"]["noNewPrivileges"]


def test_masked_and_readonly_paths_from_cri() -> None:
    linux = gen(container_config({"masked_paths": ["/bin/ls"], "readonly_paths": ["/tmp"]}))
    assert linux.spec["linux"]["maskedPaths"] == ["/bin/ls"]
    assert linux.spec["linux"]["readonlyPaths"] == ["/tmp"]


# --- seccomp, apparmor, selinux -------------------------------------------------------------


def seccomp_of(sc: dict[str, Any]) -> dict[str, Any] | None:
    linux = gen(container_config(sc)).spec["linux"]
    return linux.get("seccomp")


def syscall_rules(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_seccomp_runtime_default() -> None:
    # An empty SecurityProfile is RuntimeDefault (critest "seccomp default").
    profile = seccomp_of({"seccomp": cri.SecurityProfile()})
    assert profile is not None
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for name in ("read", "write", "execve", "openat", "exit_group", "futex", "epoll_wait"):
        assert any(r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
                   for r in syscall_rules(profile, name)), name
    for name in ("mount", "reboot", "init_module", "kexec_load", "open_by_handle_at", "setns"):
        assert not any(r["action"] == "SCMP_ACT_ALLOW" for r in syscall_rules(profile, name))
    (clone,) = syscall_rules(profile, "clone")
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    (clone3,) = syscall_rules(profile, "clone3")
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}


def test_seccomp_default_follows_capabilities() -> None:
    profile = seccomp_of({"seccomp": cri.SecurityProfile(),
                          "capabilities": cri.Capability(add_capabilities=["SYS_ADMIN"])})
    assert profile is not None
    assert any("args" not in r for r in syscall_rules(profile, "clone"))
    assert syscall_rules(profile, "mount") and syscall_rules(profile, "sethostname")
    assert not [r for r in syscall_rules(profile, "clone3") if r["action"] != "SCMP_ACT_ALLOW"]
    chroot = seccomp_of({"seccomp": cri.SecurityProfile(),
                         "capabilities": cri.Capability(drop_capabilities=["SYS_CHROOT"])})
    assert chroot is not None and not syscall_rules(chroot, "chroot")


def test_seccomp_default_profiles_are_independent() -> None:
    first = seccomp_of({"seccomp": cri.SecurityProfile()})
    assert first is not None
    first["syscalls"][0]["names"].clear()
    second = seccomp_of({"seccomp": cri.SecurityProfile()})
    assert second is not None and "read" in second["syscalls"][0]["names"]


def test_seccomp_unconfined() -> None:
    unconfined = cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)
    assert seccomp_of({"seccomp": unconfined}) is None


BLOCK_CHMOD = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}


def test_seccomp_localhost_embeds_profile(tmp_path: Path) -> None:
    path = tmp_path / "block-chmod.json"
    path.write_text(json.dumps(BLOCK_CHMOD))
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(path))
    assert seccomp_of({"seccomp": localhost}) == BLOCK_CHMOD


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "cannot read"), ("{not json", "not JSON"), ("[]", "defaultAction"),
     ('{"syscalls": []}', "defaultAction")],
)
def test_seccomp_localhost_unusable(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(path))
    with pytest.raises(InvalidArgument, match=match):
        seccomp_of({"seccomp": localhost})


def test_seccomp_localhost_relative_path_invalid() -> None:
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref="profile.json")
    with pytest.raises(InvalidArgument, match="absolute"):
        seccomp_of({"seccomp": localhost})


def test_seccomp_localhost_docker_form(tmp_path: Path) -> None:
    doc = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "comment": "x"},
            {"name": "mount", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "excludes": {"caps": ["CAP_SYS_ADMIN"]},
             "args": [{"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["arm_only"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm64"]}},
        ],
    }
    path = tmp_path / "docker.json"
    path.write_text(json.dumps(doc))
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(path))
    profile = seccomp_of({"seccomp": localhost})
    assert profile == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        ],
    }


def test_seccomp_deprecated_path(tmp_path: Path) -> None:
    assert seccomp_of({"seccomp_profile_path": ""}) is None
    assert seccomp_of({"seccomp_profile_path": "unconfined"}) is None
    for name in ("runtime/default", "docker/default"):
        profile = seccomp_of({"seccomp_profile_path": name})
        assert profile is not None and profile["defaultAction"] == "SCMP_ACT_ERRNO"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(BLOCK_CHMOD))
    assert seccomp_of({"seccomp_profile_path": f"localhost/{path}"}) == BLOCK_CHMOD
    with pytest.raises(InvalidArgument, match="seccomp"):
        seccomp_of({"seccomp_profile_path": "bogus"})


def test_seccomp_field_wins_over_deprecated_path() -> None:
    unconfined = cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)
    assert seccomp_of({"seccomp": unconfined, "seccomp_profile_path": "runtime/default"}) is None


def test_apparmor_and_selinux_ignored_with_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="criserver.runtime.oci_spec")
    apparmor = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost,
                                   localhost_ref="my-profile")
    spec = gen(container_config({
        "apparmor": apparmor, "selinux_options": cri.SELinuxOption(type="spc_t")})).spec
    assert "apparmorProfile" not in spec["process"] and "selinuxLabel" not in spec["process"]
    assert "apparmor profile ignored" in caplog.text and "container=c1" in caplog.text
    assert "selinux options ignored" in caplog.text


# --- sysctls, resources, cgroups, annotations ------------------------------------------------


def test_sysctls() -> None:
    sysctls = {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100",
               "net.ipv4.ip_unprivileged_port_start": "0"}
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(sysctls=sysctls))
    in_vm = gen(pod=pod)
    # runc refuses net.* outside a network namespace of the container: the VM applies them.
    assert in_vm.spec["linux"]["sysctl"] == {"fs.mqueue.msg_max": "100",
                                             "kernel.shm_rmid_forced": "1"}
    with_netns = gen(pod=pod, ns=PodNamespaces(ipc="i", uts="u", pid="p", net="/run/netns/x"))
    assert with_netns.spec["linux"]["sysctl"] == sysctls
    assert "sysctl" not in gen().spec["linux"]
    bad = pod_config(linux=cri.LinuxPodSandboxConfig(sysctls={"../etc/x": "1"}))
    with pytest.raises(InvalidArgument, match="sysctl"):
        gen(pod=bad)


def test_resources() -> None:
    resources = cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit_in_bytes=64 << 20,
        memory_swap_limit_in_bytes=128 << 20, oom_score_adj=999, cpuset_cpus="0-1",
        cpuset_mems="0", hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=1 << 21)],
        unified={"memory.high": "50000000", "io.weight": "default 100"},
    )
    container = container_config()
    container.linux.resources.CopyFrom(resources)
    spec = gen(container, pids_limit=200).spec
    assert spec["process"]["oomScoreAdj"] == 999
    assert spec["linux"]["resources"] == {
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": 200},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 64 << 20, "swap": 128 << 20},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 1 << 21}],
        "unified": {"io.weight": "default 100", "memory.high": "50000000"},
    }


def test_resources_absent_or_zero() -> None:
    spec = gen().spec
    assert spec["linux"]["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert "oomScoreAdj" not in spec["process"]
    container = container_config()
    container.linux.resources.CopyFrom(cri.LinuxContainerResources())
    spec = gen(container).spec
    assert spec["process"]["oomScoreAdj"] == 0
    assert set(spec["linux"]["resources"]) == {"devices"}


# Past oom_score_adj and negative shares: what runc refused only after the container existed
# (UpdateContainerResources with cpu_shares 1 answered INTERNAL; found by the CRI fuzz test).
RUNC_REFUSES = [
    cri.LinuxContainerResources(cpu_shares=1), cri.LinuxContainerResources(cpu_shares=1 << 20),
    cri.LinuxContainerResources(cpu_quota=999), cri.LinuxContainerResources(cpu_quota=-2),
    cri.LinuxContainerResources(cpu_period=999),
    cri.LinuxContainerResources(memory_limit_in_bytes=-1),
    cri.LinuxContainerResources(memory_swap_limit_in_bytes=-2),
    cri.LinuxContainerResources(cpuset_cpus="abc"), cri.LinuxContainerResources(cpuset_mems="0-"),
    cri.LinuxContainerResources(unified={"../../cgroup.procs": "1"}),
    cri.LinuxContainerResources(unified={"memory.high": "1\0"}),
]


@pytest.mark.parametrize(
    "resources",
    [cri.LinuxContainerResources(oom_score_adj=1001), cri.LinuxContainerResources(cpu_shares=-2),
     *RUNC_REFUSES],
)
def test_resources_invalid(resources: cri.LinuxContainerResources) -> None:
    container = container_config()
    container.linux.resources.CopyFrom(resources)
    with pytest.raises(InvalidArgument):
        gen(container)


@pytest.mark.parametrize("resources", RUNC_REFUSES)
def test_update_resources_refuses_what_runc_would(resources: cri.LinuxContainerResources) -> None:
    with pytest.raises(InvalidArgument):
        oci_spec.update_resources(resources)
    # -1 is "no limit" for the quota and the swap limit; the values kubelet sends pass.
    oci_spec.update_resources(cri.LinuxContainerResources(
        cpu_quota=-1, memory_swap_limit_in_bytes=-1, cpu_shares=2, cpu_period=100_000))


def test_cgroups_path() -> None:
    assert gen().spec["linux"]["cgroupsPath"] == "/criserver/p1/c1"
    spec = gen(cgroup_parent="/kubepods/pod-x/", container_id="abc").spec
    assert spec["linux"]["cgroupsPath"] == "/kubepods/pod-x/abc"


def test_annotations() -> None:
    container = container_config(annotations={"a": "1", "io.kubernetes.cri.sandbox-id": "fake"})
    annotations = gen(container).spec["annotations"]
    assert annotations == {
        "a": "1",
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-id": "p1",
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.kubernetes.cri.sandbox-uid": "pod-uid",
        "io.kubernetes.cri.image-name": "busybox:1.36",
    }
    named = gen(image_name="docker.io/library/busybox:1.36").spec["annotations"]
    assert named["io.kubernetes.cri.image-name"] == "docker.io/library/busybox:1.36"


# --- namespaces -----------------------------------------------------------------------------


def namespaces_of(options: cri.NamespaceOption, ns: PodNamespaces = NS) -> list[dict[str, str]]:
    spec = gen(container_config({"namespace_options": options}), ns=ns).spec
    result: list[dict[str, str]] = spec["linux"]["namespaces"]
    return result


def test_namespaces_pod_mode() -> None:
    assert namespaces_of(cri.NamespaceOption()) == [
        {"type": "mount"},
        {"type": "pid", "path": "/proc/7/ns/pid"},
        {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "uts", "path": "/proc/7/ns/uts"},
        {"type": "cgroup"},
    ]


def test_namespaces_container_pid_and_net_path() -> None:
    ns = PodNamespaces(ipc="/i", uts="/u", pid=None, net="/n")
    got = namespaces_of(cri.NamespaceOption(pid=cri.CONTAINER), ns)
    assert {"type": "pid"} in got
    assert {"type": "network", "path": "/n"} in got
    assert not [n for n in got if n["type"] == "pid" and "path" in n]


def test_namespaces_target_pid() -> None:
    ns = PodNamespaces(ipc="/i", uts="/u", target_pid="/proc/42/ns/pid")
    got = namespaces_of(cri.NamespaceOption(pid=cri.TARGET, target_id="c0"), ns)
    assert {"type": "pid", "path": "/proc/42/ns/pid"} in got
    with pytest.raises(FailedPrecondition):
        namespaces_of(cri.NamespaceOption(pid=cri.TARGET, target_id="c0"))
    with pytest.raises(InvalidArgument):
        namespaces_of(cri.NamespaceOption(pid=cri.TARGET), ns)


def test_namespaces_ipc_container_keeps_private_shm() -> None:
    spec = gen(container_config({"namespace_options": cri.NamespaceOption(ipc=cri.CONTAINER)})).spec
    assert {"type": "ipc"} in spec["linux"]["namespaces"]
    assert mount_at(spec, "/dev/shm")["type"] == "tmpfs"


@pytest.mark.parametrize(
    "options",
    [cri.NamespaceOption(network=cri.NODE), cri.NamespaceOption(pid=cri.NODE),
     cri.NamespaceOption(ipc=cri.NODE)],
)
def test_namespaces_node_refused(options: cri.NamespaceOption) -> None:
    with pytest.raises(InvalidArgument, match="NODE"):
        namespaces_of(options)


def test_namespaces_pod_pid_without_pod_namespace() -> None:
    with pytest.raises(FailedPrecondition):
        namespaces_of(cri.NamespaceOption(pid=cri.POD), PodNamespaces(ipc="/i", uts="/u"))


MAPPING = [cri.IDMapping(host_id=1000, container_id=0, length=65536)]
USERNS = cri.NamespaceOption(userns_options=cri.UserNamespace(mode=cri.POD, uids=MAPPING,
                                                               gids=MAPPING))


def userns_pod(options: cri.NamespaceOption = USERNS) -> cri.PodSandboxConfig:
    return pod_config(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(namespace_options=options)))


def test_user_namespace_pod_mode() -> None:
    # kubelet repeats the pod's options in each container's; the pod's are authoritative.
    for container in (container_config({"namespace_options": USERNS}), container_config()):
        linux = gen(container, userns_pod()).spec["linux"]
        assert {"type": "user"} in linux["namespaces"]  # no path: the agent has the pod's
        assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 65536}]
        assert linux["gidMappings"] == linux["uidMappings"]


def test_user_namespace_node_mode_is_none() -> None:
    # Mode NODE without mappings is what every kubelet sends for hostUsers pods.
    node = cri.NamespaceOption(userns_options=cri.UserNamespace(mode=cri.NODE))
    linux = gen(container_config({"namespace_options": node}), userns_pod(node)).spec["linux"]
    assert "user" not in {n["type"] for n in linux["namespaces"]}
    assert "uidMappings" not in linux and "gidMappings" not in linux


def test_user_namespace_container_differs_from_pod() -> None:
    other = cri.NamespaceOption(userns_options=cri.UserNamespace(
        mode=cri.POD, uids=[cri.IDMapping(host_id=5000, length=10)], gids=MAPPING))
    node = cri.NamespaceOption(userns_options=cri.UserNamespace(mode=cri.NODE))
    for container_ns, pod in ((other, userns_pod()), (USERNS, userns_pod(node)),
                              (USERNS, pod_config())):
        with pytest.raises(InvalidArgument, match="user namespace must be its pod's"):
            gen(container_config({"namespace_options": container_ns}), pod)


def test_user_namespace_refuses_privileged() -> None:
    pod = userns_pod()
    pod.linux.security_context.privileged = True
    with pytest.raises(InvalidArgument, match="privileged"):
        gen(container_config({"privileged": True}), pod)


# --- mounts ---------------------------------------------------------------------------------


def test_default_mounts() -> None:
    spec = gen().spec
    by_dest = {m["destination"]: m for m in spec["mounts"]}
    assert {k: v["type"] for k, v in by_dest.items()} == {
        "/proc": "proc", "/dev": "tmpfs", "/dev/pts": "devpts", "/dev/mqueue": "mqueue",
        "/sys": "sysfs", "/sys/fs/cgroup": "cgroup", "/dev/shm": "bind",
        "/etc/hostname": "bind", "/etc/hosts": "bind", "/etc/resolv.conf": "bind",
    }
    assert by_dest["/etc/hosts"]["source"] == "/run/criserver/vm/hosts"
    assert by_dest["/etc/resolv.conf"]["source"] == "/run/criserver/vm/resolv.conf"
    assert by_dest["/etc/hostname"]["source"] == "/run/criserver/vm/hostname"
    assert by_dest["/dev/shm"]["source"] == "/run/criserver/vm/shm"
    assert by_dest["/etc/hosts"]["options"] == ["rbind", "rprivate", "rw"]
    assert "rootfsPropagation" not in spec["linux"]


@pytest.mark.parametrize(
    ("propagation", "option", "rootfs"),
    [(cri.PROPAGATION_PRIVATE, "rprivate", None),
     (cri.PROPAGATION_HOST_TO_CONTAINER, "rslave", "rslave"),
     (cri.PROPAGATION_BIDIRECTIONAL, "rshared", "rshared")],
)
def test_cri_mount_propagation(propagation: int, option: str, rootfs: str | None) -> None:
    mount = cri.Mount(container_path="/data", host_path="/var/lib/x", propagation=propagation)
    spec = gen(container_config(mounts=[mount]), policy=SpecPolicy()).spec
    assert mount_at(spec, "/data") == {
        "destination": "/data", "type": "bind", "source": SHARED + "/var/lib/x",
        "options": ["rbind", option, "rw"],
    }
    assert spec["linux"].get("rootfsPropagation") == rootfs


def test_microvm_policy_refuses_bidirectional_propagation() -> None:
    mount = cri.Mount(container_path="/data", host_path="/var/lib/x",
                      propagation=cri.PROPAGATION_BIDIRECTIONAL)
    with pytest.raises(InvalidArgument, match="/data: Bidirectional propagation: a micro-VM"):
        gen(container_config(mounts=[mount]))


def test_cri_mounts_readonly_rro_and_relabel(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="criserver.runtime.oci_spec")
    mounts = [
        cri.Mount(container_path="/ro", host_path="/h/ro", readonly=True, selinux_relabel=True),
        cri.Mount(container_path="/rro", host_path="/h/rro", readonly=True,
                  recursive_read_only=True),
    ]
    spec = gen(container_config(mounts=mounts)).spec
    assert mount_at(spec, "/ro")["options"] == ["rbind", "rprivate", "ro"]
    assert mount_at(spec, "/rro")["options"] == ["rbind", "rprivate", "rro"]
    assert "selinux relabel ignored" in caplog.text and "mount=/ro" in caplog.text


@pytest.mark.parametrize(
    ("mount", "error"),
    [
        (cri.Mount(container_path="rel/path", host_path="/h"), InvalidArgument),
        (cri.Mount(container_path="", host_path="/h"), InvalidArgument),
        (cri.Mount(container_path="/x", host_path=""), InvalidArgument),
        (cri.Mount(container_path="/x", host_path="/h", recursive_read_only=True),
         InvalidArgument),  # critest: rro needs readonly
        (cri.Mount(container_path="/x", host_path="/h", readonly=True, recursive_read_only=True,
                   propagation=cri.PROPAGATION_HOST_TO_CONTAINER), InvalidArgument),
        (cri.Mount(container_path="/x", image=cri.ImageSpec(image="sha256:abc")), Unimplemented),
        (cri.Mount(container_path="/x", host_path="/h",
                   uidMappings=[cri.IDMapping(host_id=1, container_id=0, length=1)]),
         Unimplemented),
    ],
)
def test_cri_mount_invalid(mount: cri.Mount, error: type[Exception]) -> None:
    with pytest.raises(error):
        gen(container_config(mounts=[mount]))


def test_cri_mounts_override_pod_files_and_defaults() -> None:
    mounts = [
        cri.Mount(container_path="/etc/hosts", host_path="/kubelet/pods/u/etc-hosts"),
        cri.Mount(container_path="/dev/termination-log", host_path="/kubelet/pods/u/term"),
        cri.Mount(container_path="/proc", host_path="/h/proc"),
    ]
    spec = gen(container_config(mounts=mounts)).spec
    assert mount_at(spec, "/etc/hosts")["source"] == SHARED + "/kubelet/pods/u/etc-hosts"
    assert mount_at(spec, "/proc")["type"] == "bind"
    assert mount_at(spec, "/etc/resolv.conf")["source"].startswith("/run/criserver/vm/")
    dests = [m["destination"] for m in spec["mounts"]]
    assert dests.index("/dev") < dests.index("/dev/termination-log")


def test_cri_dev_mount_drops_default_dev_mounts() -> None:
    mounts = [cri.Mount(container_path="/dev", host_path="/dev")]
    spec = gen(container_config(mounts=mounts)).spec
    dests = [m["destination"] for m in spec["mounts"]]
    assert "/dev/pts" not in dests and "/dev/mqueue" not in dests
    assert dests.count("/dev") == 1
    # The pod's shm is not a default: it still goes on top of the supplied /dev.
    assert dests.index("/dev") < dests.index("/dev/shm")


def test_mounts_parents_before_children() -> None:
    mounts = [
        cri.Mount(container_path="/a/b/c", host_path="/h3"),
        cri.Mount(container_path="/a", host_path="/h1"),
        cri.Mount(container_path="/a/b", host_path="/h2"),
    ]
    dests = [m["destination"] for m in gen(container_config(mounts=mounts)).spec["mounts"]]
    assert dests.index("/a") < dests.index("/a/b") < dests.index("/a/b/c")


def test_image_volume_mount_binds_the_agents_guest_path() -> None:
    mount = cri.Mount(container_path="/mnt/iv/", readonly=True, image_sub_path="etc",
                      image=cri.ImageSpec(image="sha256:abc"))
    guest_path = "/run/criserver/imagevolumes/c1/0"
    spec = gen(container_config(mounts=[mount]), image_volumes={"/mnt/iv/": guest_path}).spec
    assert mount_at(spec, "/mnt/iv") == {
        "destination": "/mnt/iv", "type": "bind", "source": guest_path,
        "options": ["rbind", "rprivate", "ro"],  # never noexec: the image's binaries run
    }


def test_image_volumes_ignored() -> None:
    image = ImageConfigView(cmd=("x",), volumes=("/var/lib/data",))
    dests = [m["destination"] for m in gen(image=image).spec["mounts"]]
    assert "/var/lib/data" not in dests


@pytest.mark.parametrize(
    "kw",
    [{"devices": [cri.Device(container_path="/dev/fuse", host_path="/dev/fuse",
                             permissions="rwm")]},
     {"CDI_devices": [cri.CDIDevice(name="vendor.com/gpu=0")]}],
)
def test_devices_unimplemented(kw: dict[str, Any]) -> None:
    with pytest.raises(Unimplemented):
        gen(container_config(**kw))


# --- a host-like policy: what the neutral generator builds ----------------------------------

HOST = SpecPolicy(apparmor_default="criserver-default")
NET_NS = PodNamespaces(ipc="/proc/7/ns/ipc", uts="/proc/7/ns/uts", pid="/proc/7/ns/pid",
                       net="/proc/7/ns/net")


def host_gen(container: cri.ContainerConfig, pod: cri.PodSandboxConfig | None = None,
             **kw: Any) -> GeneratedSpec:
    return gen(container, pod, ns=kw.pop("ns", NET_NS), policy=kw.pop("policy", HOST), **kw)


def test_microvm_policy_refuses_host_network_with_one_message() -> None:
    with pytest.raises(InvalidArgument, match="network namespace mode NODE: hostNetwork"):
        MICROVM.check_namespaces(cri.NamespaceOption(network=cri.NODE))
    # run_sandbox checks the network only: hostPID/hostIPC fail at CreateContainer.
    MICROVM.check_namespaces(cri.NamespaceOption(pid=cri.NODE, ipc=cri.NODE), kinds=("network",))


def test_host_policy_node_namespaces() -> None:
    options = cri.NamespaceOption(network=cri.NODE, pid=cri.NODE, ipc=cri.NODE)
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(
        sysctls={"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"}))
    out = host_gen(container_config({"namespace_options": options}), pod)
    # No entry: the node's network, UTS (its hostname), pid and IPC namespaces.
    assert out.spec["linux"]["namespaces"] == [{"type": "mount"}, {"type": "cgroup"}]
    assert "hostname" not in out.spec
    assert mount_at(out.spec, "/dev/shm")["source"] == "/dev/shm"
    # net.* would change the node's network: never in the spec of a hostNetwork container.
    assert out.spec["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}


def test_host_policy_node_network_only() -> None:
    out = host_gen(container_config({"namespace_options": cri.NamespaceOption(
        network=cri.NODE)}))
    assert out.spec["linux"]["namespaces"] == [
        {"type": "mount"}, {"type": "pid", "path": "/proc/7/ns/pid"},
        {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "cgroup"},
    ]
    pod_net = host_gen(container_config()).spec
    assert {"type": "network", "path": "/proc/7/ns/net"} in pod_net["linux"]["namespaces"]
    assert {"type": "uts", "path": "/proc/7/ns/uts"} in pod_net["linux"]["namespaces"]
    assert pod_net["hostname"] == "web-host"


def test_host_policy_devices() -> None:
    null = os.stat("/dev/null")
    device = cri.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")
    linux = host_gen(container_config(devices=[device])).spec["linux"]
    assert linux["devices"] == [{
        "path": "/dev/mynull", "type": "c", "major": 1, "minor": 3,
        "fileMode": null.st_mode & 0o7777, "uid": null.st_uid, "gid": null.st_gid,
    }]
    assert linux["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_host_policy_device_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    os.mknod(tmp_path / "sub" / "zero", 0o620 | 0o020000, os.makedev(1, 5))
    (tmp_path / "not-a-device").write_text("")
    device = cri.Device(container_path="/dev/x", host_path=str(tmp_path), permissions="r")
    linux = host_gen(container_config(devices=[device])).spec["linux"]
    assert [(d["path"], d["major"], d["minor"]) for d in linux["devices"]] == [
        ("/dev/x/sub/zero", 1, 5)]


@pytest.mark.parametrize(
    ("device", "error"),
    [
        (cri.Device(container_path="/dev/n", host_path="/dev/null", permissions="rwx"),
         InvalidArgument),
        (cri.Device(container_path="/dev/n", host_path="/etc/hostname"), InvalidArgument),
        (cri.Device(container_path="/dev/n", host_path="/no/such/device"), InvalidArgument),
        (cri.Device(container_path="dev/n", host_path="/dev/null"), InvalidArgument),
    ],
)
def test_host_policy_devices_invalid(device: cri.Device, error: type[Exception]) -> None:
    with pytest.raises(error):
        host_gen(container_config(devices=[device]))


def test_host_policy_cdi_devices_unimplemented() -> None:
    with pytest.raises(Unimplemented, match="CDI"):
        host_gen(container_config(CDI_devices=[cri.CDIDevice(name="vendor.com/gpu=0")]))


@pytest.mark.parametrize(
    ("sc", "profile"),
    [
        ({"apparmor": cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost,
                                          localhost_ref="localhost/my-profile")}, "my-profile"),
        ({"apparmor": cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost,
                                          localhost_ref="my-profile")}, "my-profile"),
        ({"apparmor_profile": "localhost/old-style"}, "old-style"),
        ({"apparmor": cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)},
         "criserver-default"),
        ({"apparmor_profile": "runtime/default"}, "criserver-default"),
        ({"apparmor": cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)}, None),
        ({"apparmor_profile": "unconfined"}, None),
        ({}, None),
    ],
)
def test_host_policy_apparmor(sc: dict[str, Any], profile: str | None) -> None:
    process = host_gen(container_config(sc)).spec["process"]
    assert process.get("apparmorProfile") == profile


def test_host_policy_apparmor_privileged_and_invalid() -> None:
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(privileged=True)))
    default = host_gen(container_config({"privileged": True, "apparmor_profile":
                                         "runtime/default"}), pod).spec["process"]
    assert "apparmorProfile" not in default
    for bad in ({"apparmor_profile": "bogus"},
                {"apparmor": cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost)}):
        with pytest.raises(InvalidArgument, match="apparmor"):
            host_gen(container_config(bad))


def test_host_policy_selinux(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="criserver.runtime.oci_spec")
    mounts = [cri.Mount(container_path="/a", host_path="/h/a", selinux_relabel=True),
              cri.Mount(container_path="/b", host_path="/h/b")]
    out = host_gen(container_config(
        {"selinux_options": cri.SELinuxOption(level="s0:c1,c2")}, mounts=mounts))
    assert out.spec["process"]["selinuxLabel"] == "system_u:system_r:container_t:s0:c1,c2"
    assert out.selinux_relabel == ("/h/a",)
    typed = host_gen(container_config({"selinux_options": cri.SELinuxOption(type="spc_t")}))
    assert typed.spec["process"]["selinuxLabel"] == "system_u:system_r:spc_t:s0"
    assert "selinuxLabel" not in host_gen(container_config()).spec["process"]
    assert "ignored" not in caplog.text


@pytest.mark.parametrize(
    ("policy", "pod_parent", "path"),
    [
        (HOST, "", "/criserver/p1/c1"),
        (HOST, "/kubepods/besteffort/podx", "/kubepods/besteffort/podx/c1"),
        (SpecPolicy(cgroup_driver="systemd"), "", "system.slice:criserver:c1"),
        (SpecPolicy(cgroup_driver="systemd"),
         "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podx.slice",
         "kubepods-besteffort-podx.slice:criserver:c1"),
        # The guest's cgroups are the agent's: the host pod's parent means nothing there.
        (MICROVM, "/kubepods/besteffort/podx", "/criserver/p1/c1"),
    ],
)
def test_cgroups_path_per_policy(policy: SpecPolicy, pod_parent: str, path: str) -> None:
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(cgroup_parent=pod_parent))
    assert gen(pod=pod, policy=policy).spec["linux"]["cgroupsPath"] == path


def test_systemd_cgroup_parent_must_be_a_slice() -> None:
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods/podx"))
    with pytest.raises(InvalidArgument, match="not a systemd slice"):
        gen(pod=pod, policy=SpecPolicy(cgroup_driver="systemd"))


@pytest.mark.parametrize(
    "kw", [{"cgroup_driver": "cgroupv3"}, {"node_namespaces_refused": {"user": "no"}},
           {"selinux_default": "user:role:type"}],
)
def test_spec_policy_validated(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SpecPolicy(**kw)


# --- plumbing ------------------------------------------------------------------------------


def test_image_config_view_from_record_dict() -> None:
    info = ImageConfigInfo(
        diff_ids=("sha256:" + "0" * 64,), user="1000:1000", entrypoint=("/e",), cmd=("c",),
        env=("A=1",), working_dir="/w", volumes=("/v",),
    )
    assert ImageConfigView.from_dict(info.as_dict()) == ImageConfigView(
        user="1000:1000", entrypoint=("/e",), cmd=("c",), env=("A=1",), working_dir="/w",
        volumes=("/v",),
    )
    assert ImageConfigView.from_dict({}) == ImageConfigView()


def test_to_json_roundtrip() -> None:
    out = gen()
    assert json.loads(out.to_json()) == out.spec


async def test_generate_async() -> None:
    out = await generate_async(container_config(), pod_config(), IMAGE, NS, guest,
                               policy=MICROVM, container_id="c9", sandbox_id="p9")
    assert out.spec["linux"]["cgroupsPath"] == "/criserver/p9/c9"


# --- real runc on the host ------------------------------------------------------------------

BUSYBOX = shutil.which("busybox")
RUNC = shutil.which("runc")
needs_runc = pytest.mark.skipif(
    os.geteuid() != 0 or not BUSYBOX or not RUNC, reason="needs root, runc and busybox"
)


@dataclass
class RuncHost:
    tmp: Path
    ns: PodNamespaces
    sandbox_dir: Path
    rootfs: Path
    cgroup_parent: str

    def run(
        self, container: cri.ContainerConfig, pod: cri.PodSandboxConfig | None = None,
        ns: PodNamespaces | None = None, policy: SpecPolicy = MICROVM,
    ) -> subprocess.CompletedProcess[str]:
        cid = "t" + uuid.uuid4().hex[:12]
        out = generate(
            container, pod or pod_config(), None, ns or self.ns, lambda m: m.host_path,
            policy=policy, container_id=cid, sandbox_id="p", cgroup_parent=self.cgroup_parent,
            sandbox_dir=str(self.sandbox_dir),
        )
        bundle = self.tmp / cid
        bundle.mkdir()
        out.spec["root"]["path"] = str(self.rootfs)
        # This host's root lacks some capabilities (CAP_SYS_RESOURCE) and runc cannot grant what
        # it does not hold; the guest's root holds them all.
        held = _host_bounding()
        for key, names in out.spec["process"]["capabilities"].items():
            out.spec["process"]["capabilities"][key] = [n for n in names if n in held]
        (bundle / "config.json").write_bytes(out.to_json())
        state = str(self.tmp / "state")
        try:
            return subprocess.run(
                [RUNC or "runc", "--root", state, "run", "--bundle", str(bundle), cid],
                capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
            )
        finally:
            subprocess.run([RUNC or "runc", "--root", state, "delete", "--force", cid],
                           capture_output=True, timeout=30, check=False)


def _host_bounding() -> set[str]:
    mask = int(status_fields(Path("/proc/self/status").read_text())["CapBnd"], 16)
    return {name for number, name in enumerate(ALL_CAPS) if mask >> number & 1}


def _make_rootfs(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX or "busybox", root / "bin" / "busybox")
    for applet in ("sh", "id", "cat", "grep", "touch", "chmod", "hostname", "echo", "mount",
                   "ls", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "etc", "data"):
        (root / d).mkdir()


@pytest.fixture
def runc_host(tmp_path: Path) -> Iterator[RuncHost]:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "shm").mkdir()
    (sandbox / "hosts").write_text("127.0.0.1 localhost\n")
    (sandbox / "resolv.conf").write_text("nameserver 10.0.0.10\n")
    (sandbox / "hostname").write_text("web-host\n")
    rootfs = tmp_path / "rootfs"
    _make_rootfs(rootfs)
    # The pod's shared namespaces, held by a process as the guest agent would.
    holder = subprocess.Popen(
        ["unshare", "--ipc", "--uts", "--net", "--pid", "--fork", "--mount-proc",
         "sleep", "600"], stdin=subprocess.DEVNULL,
    )
    parent = f"/criserver-test-{uuid.uuid4().hex[:8]}"
    try:
        own = os.readlink("/proc/self/ns/ipc")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/ipc") == own:
            assert time.monotonic() < deadline, "unshare did not start"
            time.sleep(0.01)
        base = f"/proc/{holder.pid}/ns"
        ns = PodNamespaces(ipc=f"{base}/ipc", uts=f"{base}/uts",
                           pid=f"{base}/pid_for_children", net=f"{base}/net")
        yield RuncHost(tmp_path, ns, sandbox, rootfs, parent)
    finally:
        holder.kill()
        holder.wait()
        for controller in Path("/sys/fs/cgroup").iterdir():
            leftover = controller / parent.lstrip("/") / "p"
            for d in (leftover, leftover.parent):
                if d.is_dir():
                    for child in sorted(d.glob("*/"), reverse=True):
                        if child.is_dir():
                            child.rmdir()
                    d.rmdir()


def status_fields(output: str) -> dict[str, str]:
    fields = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cap_mask(names: Iterator[str] | list[str] | tuple[str, ...]) -> str:
    return f"{sum(1 << ALL_CAPS.index(n) for n in names):016x}"


SHOW = ["sh", "-c", "id; grep -E '^(Seccomp|CapBnd|CapEff|NoNewPrivs):' /proc/self/status; "
        "echo host=$(hostname) env=$HOSTNAME pid=$$; "
        "echo shm=$(cat /proc/sys/kernel/shm_rmid_forced) mq=$(cat /proc/sys/fs/mqueue/msg_max)"]


@needs_runc
def test_runc_runs_default_spec(runc_host: RuncHost) -> None:
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(
        sysctls={"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}))
    container = container_config(
        {"run_as_user": cri.Int64Value(value=1001), "run_as_group": cri.Int64Value(value=1002),
         "supplemental_groups": [1234], "seccomp": cri.SecurityProfile()},
        command=SHOW,
    )
    result = runc_host.run(container, pod)
    assert result.returncode == 0, result.stderr
    fields = status_fields(result.stdout)
    assert "uid=1001 gid=1002 groups=1234" in result.stdout
    assert fields["Seccomp"] == "2"  # RuntimeDefault is enforced (critest "seccomp default")
    assert fields["CapBnd"] == cap_mask(DEFAULT_CAPS)
    assert fields["CapEff"] == "0" * 16  # a non-root user keeps no effective capabilities
    assert fields["NoNewPrivs"] == "0"
    assert "host=web-host env=web-host" in result.stdout
    assert "pid=1" not in result.stdout  # joined the pod's pid namespace, whose init is sleep
    assert "shm=1 mq=100" in result.stdout  # critest safe and unsafe sysctls


@needs_runc
def test_runc_root_default_caps_unconfined(runc_host: RuncHost) -> None:
    result = runc_host.run(container_config(
        {"namespace_options": cri.NamespaceOption(pid=cri.CONTAINER), "no_new_privs": True},
        command=SHOW))
    assert result.returncode == 0, result.stderr
    fields = status_fields(result.stdout)
    assert "uid=0 gid=0" in result.stdout
    assert fields["Seccomp"] == "0"  # no profile: unconfined (critest "nil profile")
    assert fields["CapEff"] == fields["CapBnd"] == cap_mask(DEFAULT_CAPS)
    assert fields["NoNewPrivs"] == "1"
    assert "pid=1" in result.stdout  # NamespaceMode CONTAINER: a pid namespace of its own


@needs_runc
@pytest.mark.parametrize(
    ("capability", "bounding"),
    [({"drop_capabilities": ["ALL"]}, ()),
     ({"add_capabilities": ["NET_ADMIN"], "drop_capabilities": ["NET_RAW"]},
      tuple(set(DEFAULT_CAPS) - {"CAP_NET_RAW"} | {"CAP_NET_ADMIN"}))],
)
def test_runc_capabilities(
    runc_host: RuncHost, capability: dict[str, list[str]], bounding: tuple[str, ...]
) -> None:
    result = runc_host.run(container_config(
        {"capabilities": cri.Capability(**capability)}, command=SHOW))
    assert result.returncode == 0, result.stderr
    assert status_fields(result.stdout)["CapBnd"] == cap_mask(bounding)


@needs_runc
def test_runc_readonly_rootfs_and_mounts(runc_host: RuncHost, tmp_path: Path) -> None:
    rw_dir, ro_dir = tmp_path / "rw", tmp_path / "ro"
    rw_dir.mkdir()
    ro_dir.mkdir()
    mounts = [cri.Mount(container_path="/data", host_path=str(rw_dir)),
              cri.Mount(container_path="/ro", host_path=str(ro_dir), readonly=True)]
    script = ("touch /rootfile 2>&1; touch /data/f && echo data-ok; touch /ro/f 2>&1; "
              "cat /etc/resolv.conf; touch /etc/hosts 2>&1; touch /dev/shm/s && echo shm-ok")
    result = runc_host.run(container_config(
        {"readonly_rootfs": True}, command=["sh", "-c", script], mounts=mounts))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "touch: /rootfile: Read-only file system" in out  # critest ReadOnlyRootfs
    assert "data-ok" in out and (rw_dir / "f").exists()
    assert "touch: /ro/f: Read-only file system" in out
    assert "nameserver 10.0.0.10" in out
    assert "touch: /etc/hosts: Read-only file system" in out
    assert "shm-ok" in out and (runc_host.sandbox_dir / "shm" / "s").exists()


@needs_runc
def test_runc_writable_rootfs_and_readonly_paths(runc_host: RuncHost) -> None:
    script = "touch /rootfile && echo found; touch /tmp/test"
    result = runc_host.run(container_config(
        {"readonly_paths": ["/tmp"]}, command=["sh", "-c", script]))
    assert "found" in result.stdout  # critest ReadOnlyRootfs false
    assert "touch: /tmp/test: Read-only file system" in result.stderr  # critest ReadonlyPaths
    assert result.returncode != 0


@needs_runc
def test_runc_seccomp_localhost_blocks_chmod(runc_host: RuncHost, tmp_path: Path) -> None:
    path = tmp_path / "block-chmod.json"
    path.write_text(json.dumps(BLOCK_CHMOD))
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(path))
    result = runc_host.run(container_config(
        {"seccomp": localhost}, command=["chmod", "400", "/tmp"]))
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr  # critest seccomp localhost


@needs_runc
@pytest.mark.parametrize("sys_admin", [False, True])
def test_runc_default_seccomp_follows_sys_admin(runc_host: RuncHost, sys_admin: bool) -> None:
    # mount(2) is allowed by the default profile only together with CAP_SYS_ADMIN.
    added = ["SYS_ADMIN"] if sys_admin else []
    result = runc_host.run(container_config(
        {"seccomp": cri.SecurityProfile(), "capabilities": cri.Capability(add_capabilities=added)},
        command=["sh", "-c", "grep ^Seccomp: /proc/self/status; mount -t tmpfs none /tmp && "
                 "echo mounted"]))
    assert status_fields(result.stdout)["Seccomp"] == "2"
    assert ("mounted" in result.stdout) is sys_admin, result.stderr


@needs_runc
def test_runc_privileged(runc_host: RuncHost, tmp_path: Path) -> None:
    path = tmp_path / "block-hostname.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]}))
    localhost = cri.SecurityProfile(
        profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(path))
    pod = pod_config(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(privileged=True)))
    script = ("grep -E '^(Seccomp|CapBnd):' /proc/self/status; hostname changed && echo set-ok; "
              "mount -t tmpfs none /tmp && echo mount-ok")
    result = runc_host.run(container_config(
        {"privileged": True, "seccomp": localhost}, command=["sh", "-c", script]), pod)
    assert result.returncode == 0, result.stderr
    fields = status_fields(result.stdout)
    assert fields["Seccomp"] == "0"  # critest: privileged ignores the seccomp profile
    assert int(fields["CapBnd"], 16) & int(cap_mask(("CAP_SYS_ADMIN", "CAP_NET_ADMIN")), 16)
    assert "set-ok" in result.stdout and "mount-ok" in result.stdout


@needs_runc
def test_runc_host_policy_node_namespaces_and_device(runc_host: RuncHost) -> None:
    options = cri.NamespaceOption(network=cri.NODE, pid=cri.NODE, ipc=cri.NODE)
    device = cri.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")
    script = ("echo net=$(readlink /proc/self/ns/net) ipc=$(readlink /proc/self/ns/ipc) "
              "host=$(hostname); echo data > /dev/mynull && echo device-ok")
    result = runc_host.run(container_config(
        {"namespace_options": options}, devices=[device], command=["sh", "-c", script]),
        policy=HOST)
    assert result.returncode == 0, result.stderr
    assert f"net={os.readlink('/proc/self/ns/net')} " in result.stdout
    assert f"ipc={os.readlink('/proc/self/ns/ipc')} " in result.stdout
    assert f"host={os.uname().nodename}" in result.stdout
    assert "device-ok" in result.stdout
