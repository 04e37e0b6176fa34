"""Unit tests of the agent's container logic that needs no VM: user resolution from passwd and
group files (symlinks resolved inside the rootfs), OCI spec completion, the offset-addressed
output log, cgroup file parsing and exit reasons, and the fast exec path's plan and report."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vmagent import cgroups, fastexec, mountutil
from vmagent.idmap import IdMaps, idmapped_clone, spec_id_maps, write_maps
from vmagent.ocispec import (
    GUEST_DEVICES_ANNOTATION,
    PodContext,
    complete_spec,
    exec_process,
    guest_devices,
    guest_hugepage_sizes,
    load_spec,
    wants_guest_devices,
)
from vmagent.pid1 import Reaper
from vmagent.podns import PodNamespaces
from vmagent.rootfs import executable_in_rootfs, read_ahead
from vmagent.stdio import STDERR, STDOUT, OutputLog
from vmagent.users import (
    ResolvedUser,
    read_in_root,
    resolve_in_root,
    resolve_in_rootfs,
    resolve_user,
)

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "# comment\n"
          "app:x:1000:1001:App:/home/app:/bin/sh\n"
          "web:x:33:33::/var/www:/bin/false\n")
GROUP = "root:x:0:\napp:x:1001:\nextra:x:2000:app,web\nwww:x:33:\nother:x:3000:web\n"


@pytest.mark.parametrize(("user", "want"), [
    ("app", ResolvedUser(1000, 1001, [1001, 2000], "/home/app")),
    ("1000", ResolvedUser(1000, 1001, [1001, 2000], "/home/app")),
    ("app:www", ResolvedUser(1000, 33, [33, 2000], "/home/app")),
    ("app:4242", ResolvedUser(1000, 4242, [4242, 2000], "/home/app")),
    ("web", ResolvedUser(33, 33, [33, 2000, 3000], "/var/www")),
    ("4242", ResolvedUser(4242, 0, [0], "/")),  # numeric, not in passwd
    ("4242:extra", ResolvedUser(4242, 2000, [2000], "/")),
])
def test_resolve_user(user: str, want: ResolvedUser) -> None:
    assert resolve_user(user, PASSWD, GROUP) == want


def test_resolve_user_keeps_supplemental_groups_after_the_image_ones() -> None:
    got = resolve_user("app", PASSWD, GROUP, extra_gids=[5000, 2000])
    assert got.additional_gids == [1001, 2000, 5000]


def test_resolve_user_strict_leaves_out_the_image_groups() -> None:
    """SupplementalGroupsPolicy Strict: the primary gid (still from passwd) and the CRI's
    supplemental groups, nothing /etc/group lists the user in."""
    got = resolve_user("1000", PASSWD, GROUP, extra_gids=[1234], image_groups=False)
    assert (got.uid, got.gid, got.additional_gids) == (1000, 1001, [1001, 1234])
    assert resolve_user("web:www", PASSWD, GROUP, image_groups=False).additional_gids == [33]


@pytest.mark.parametrize("user", ["nobody", "app:nogroup", ":0", ""])
def test_resolve_user_rejects_unknown_names(user: str) -> None:
    with pytest.raises(GRPCError) as err:
        resolve_user(user, PASSWD, GROUP)
    assert err.value.status is Status.INVALID_ARGUMENT


def test_passwd_symlinks_resolve_inside_the_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "real").mkdir()
    (root / "real/passwd").write_text(PASSWD)
    (root / "real/group").write_text(GROUP)
    # An absolute link must mean <rootfs>/real/passwd, never the guest's own file.
    (root / "etc/passwd").symlink_to("/real/passwd")
    (root / "etc/group").symlink_to("../../../../real/group")
    assert resolve_in_rootfs("app", str(root)).uid == 1000
    outside = tmp_path / "outside"
    outside.write_text("evil:x:0:0::/:/bin/sh\n")
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to(str(outside))
    assert read_in_root(str(root), "/etc/passwd") is None
    (root / "etc/loop").symlink_to("loop")
    assert read_in_root(str(root), "/etc/loop") is None


def test_resolve_in_root_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/etc").mkdir(parents=True)
    (root / "etc").symlink_to("/usr/etc")
    assert resolve_in_root(str(root), "etc") == str(root / "usr/etc")
    assert resolve_in_root(str(root), "../../etc/.") == str(root / "usr/etc")
    assert resolve_in_root(str(root), "") == str(root)
    assert resolve_in_root(str(root), "missing") is None
    (root / "file").write_text("x")
    assert resolve_in_root(str(root), "file/below") is None


SPEC = {
    "process": {"args": ["sh"], "env": ["A=1"], "cwd": "/work", "user": {"uid": 5, "gid": 6},
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                 "permitted": ["CAP_KILL"]}, "noNewPrivileges": True},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "from-host",
    "hooks": {"prestart": [{"path": "/usr/bin/host-only"}]},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
               {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
               {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts"},
               {"destination": "/data", "type": "bind",
                "source": "/run/criserver/shared/v1"}],
    "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
              "cgroupsPath": "kubepods-besteffort.slice:cri:abc"},
}
POD = PodContext(hosts="/run/criserver/hosts", resolv_conf="/run/criserver/resolv.conf",
                 shm="/run/criserver/shm", ipc_uts_pid=42, pid_ns_pid=43)


def test_complete_spec() -> None:
    out = complete_spec(SPEC, container_id="c1", rootfs="/run/b/c1/rootfs", pod=POD)
    assert out["root"] == {"path": "/run/b/c1/rootfs", "readonly": True}
    assert out["linux"]["cgroupsPath"] == "/criserver/c1"
    assert "hooks" not in out and "hostname" not in out
    ns = {n["type"]: n.get("path") for n in out["linux"]["namespaces"]}
    assert ns == {"ipc": "/proc/42/ns/ipc", "uts": "/proc/42/ns/uts", "pid": None,
                  "mount": None}  # no network entry: the VM's own
    mounts = {m["destination"]: m for m in out["mounts"]}
    assert mounts["/etc/hosts"]["source"] == "/run/criserver/hosts"
    assert "ro" in mounts["/etc/hosts"]["options"]  # read-only root: read-only pod files
    assert mounts["/etc/resolv.conf"]["source"] == "/run/criserver/resolv.conf"
    assert "/etc/hostname" not in mounts  # the pod has no hostname file
    assert mounts["/dev/shm"]["source"] == "/run/criserver/shm"
    assert mounts["/data"]["source"] == "/run/criserver/shared/v1"
    assert [m["destination"] for m in out["mounts"]].count("/dev/shm") == 1
    assert out["process"]["user"] == {"uid": 5, "gid": 6}
    assert out["process"]["env"][0].startswith("PATH=") and "A=1" in out["process"]["env"]
    assert SPEC["linux"]["cgroupsPath"] == "kubepods-besteffort.slice:cri:abc"  # not mutated


def test_complete_spec_user_and_pid_modes() -> None:
    user = ResolvedUser(1000, 1001, [1001, 2000], "/home/app")
    out = complete_spec(SPEC, container_id="c1", rootfs="/r", pod=POD, pid_mode=1, user=user)
    assert out["process"]["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 2000]}
    assert "HOME=/home/app" in out["process"]["env"]
    ns = {n["type"]: n.get("path") for n in out["linux"]["namespaces"]}
    assert ns["pid"] == "/proc/43/ns/pid"
    out = complete_spec(SPEC, container_id="c1", rootfs="/r", pod=POD, pid_mode=2)
    assert "pid" not in {n["type"] for n in out["linux"]["namespaces"]}


def test_complete_spec_of_a_container_outside_any_pod() -> None:
    out = complete_spec(SPEC, container_id="w1", rootfs="/r",
                        pod=PodContext(outside_pod=True, ipc_uts_pid=7, shm="/run/shm"))
    ns = {n["type"]: n.get("path") for n in out["linux"]["namespaces"]}
    assert ns == {"ipc": "/proc/7/ns/ipc", "uts": "/proc/7/ns/uts", "pid": None, "mount": None}
    assert "hostname" not in out  # the VM's, which SetupSandbox sets once it is a pod's
    mounts = {m["destination"]: m for m in out["mounts"]}
    assert "/etc/hosts" not in mounts and "/etc/resolv.conf" not in mounts
    assert mounts["/dev/shm"]["source"] == "/run/shm"
    assert {"/proc", "/data"} <= set(mounts)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_guest_devices_lists_device_nodes_as_runc_does(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "pts").mkdir(parents=True)
    (dev / "block").mkdir()
    os.mknod(dev / "null", 0o20666, os.makedev(1, 3))
    os.chmod(dev / "null", 0o666)  # whatever the umask
    os.mknod(dev / "block/vda", 0o60660, os.makedev(254, 0))
    os.chmod(dev / "block/vda", 0o660)
    os.mknod(dev / "pts/0", 0o20620, os.makedev(136, 0))  # devpts: mounted on its own
    os.mknod(dev / "console", 0o20600, os.makedev(5, 1))  # runc makes its own
    (dev / "stdin").symlink_to("/proc/self/fd/0")
    (dev / "file").write_text("")
    assert guest_devices(str(dev)) == [
        {"path": f"{dev}/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666,
         "uid": 0, "gid": 0},
        {"path": f"{dev}/block/vda", "type": "b", "major": 254, "minor": 0, "fileMode": 0o660,
         "uid": 0, "gid": 0},
    ]


def test_complete_spec_adds_guest_devices_of_a_privileged_container() -> None:
    spec = json.loads(json.dumps(SPEC))
    spec["annotations"] = {GUEST_DEVICES_ANNOTATION: "true", "user": "kept"}
    spec["linux"]["devices"] = [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
    assert wants_guest_devices(spec) and not wants_guest_devices(SPEC)
    found = [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 228},
             {"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}]
    out = complete_spec(spec, container_id="c1", rootfs="/r", pod=POD, devices=found)
    assert out["linux"]["devices"] == [  # the spec's own entry wins over the guest's
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        {"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}]
    assert out["annotations"] == {"user": "kept"}  # the agent's marker stays out of runc's
    assert "devices" not in complete_spec(SPEC, container_id="c1", rootfs="/r",
                                          pod=POD)["linux"]


def test_guest_hugepage_sizes_are_named_as_runc_names_them(tmp_path: Path) -> None:
    for name in ("hugepages-2048kB", "hugepages-1048576kB", "hugepages-64kB", "other"):
        (tmp_path / name).mkdir()
    assert guest_hugepage_sizes(str(tmp_path)) == {"2MB", "1GB", "64KB"}
    assert guest_hugepage_sizes(str(tmp_path / "missing")) == frozenset()


def test_complete_spec_drops_hugepage_limits_of_sizes_the_guest_lacks() -> None:
    """kubelet limits every huge page size of the node; runc fails on a size whose hugetlb
    cgroup file the guest kernel does not have."""
    spec = json.loads(json.dumps(SPEC))
    spec["linux"]["resources"] = {"memory": {"limit": 1 << 30}, "hugepageLimits": [
        {"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 0}]}
    out = complete_spec(spec, container_id="c1", rootfs="/r", pod=POD,
                        hugepage_sizes=frozenset({"2MB"}))
    assert out["linux"]["resources"] == {"memory": {"limit": 1 << 30},
                                         "hugepageLimits": [{"pageSize": "2MB", "limit": 0}]}
    out = complete_spec(spec, container_id="c1", rootfs="/r", pod=POD,
                        hugepage_sizes=frozenset())
    assert out["linux"]["resources"] == {"memory": {"limit": 1 << 30}}
    assert len(spec["linux"]["resources"]["hugepageLimits"]) == 2  # not mutated
    assert complete_spec(spec, container_id="c1", rootfs="/r", pod=POD)["linux"][
        "resources"] == spec["linux"]["resources"]  # no sizes given: left as they are


def test_load_spec_rejects() -> None:
    for raw in (b"not json", b"[]", b'{"process": {}}', b'{"process": {"args": []}}'):
        with pytest.raises(GRPCError) as err:
            load_spec(raw, "c1")
        assert err.value.status is Status.INVALID_ARGUMENT
    assert load_spec(json.dumps(SPEC).encode(), "c1")["process"]["args"] == ["sh"]


def test_exec_process_inherits_the_container_process() -> None:
    p = exec_process(SPEC, ["ls"], [], "", None)
    assert p["args"] == ["ls"] and p["env"] == ["A=1"] and p["cwd"] == "/work"
    assert p["capabilities"] == SPEC["process"]["capabilities"] and p["noNewPrivileges"]
    p = exec_process(SPEC, ["ls"], ["B=2"], "/tmp", (7, 8, [9]))
    assert (p["env"], p["cwd"], p["user"]) == (
        ["B=2"], "/tmp", {"uid": 7, "gid": 8, "additionalGids": [9]})


async def test_output_log_offsets_ack_and_overflow() -> None:
    log = OutputLog(limit=10)
    log.append(STDOUT, b"abcd")
    log.append(STDERR, b"EF")
    chunks = log.read(0)
    assert [(c.offset, c.stream, c.data) for c in chunks] == [(0, STDOUT, b"abcd"),
                                                             (4, STDERR, b"EF")]
    assert [c.data for c in log.read(2)] == [b"cd", b"EF"]  # mid-chunk offset
    log.ack(3)
    assert log.start == 3 and log.kept == 3
    # The host falls behind: the oldest bytes go, and a reader from 0 sees the gap.
    log.append(STDOUT, b"0123456789xy")
    assert (log.start, log.end, log.kept, log.dropped) == (8, 18, 10, 5)
    first = log.read(0)[0]
    assert (first.offset, first.data) == (8, b"23456789xy")
    assert log.read(18) == []
    log.close()
    assert log.eof
    log.append(STDOUT, b"late")  # nothing after EOF
    assert log.end == 18


async def test_output_log_wait_beyond() -> None:
    import asyncio

    log = OutputLog()
    waiter = asyncio.ensure_future(log.wait_beyond(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    log.append(STDOUT, b"x")
    await asyncio.wait_for(waiter, 1)
    eof = asyncio.ensure_future(log.wait_eof())
    log.close()
    await asyncio.wait_for(eof, 1)


def test_cgroup_parsing_and_reasons(tmp_path: Path) -> None:
    d = tmp_path / "cg"
    d.mkdir()
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (d / "memory.current").write_text("1048576\n")
    (d / "memory.stat").write_text("anon 4096\nfile 8192\ninactive_file 8192\n")
    (d / "pids.current").write_text("3\n")
    assert cgroups.oom_kills(str(d)) == 1
    u = cgroups.usage(str(d))
    assert (u.cpu_usage_ns, u.memory_usage, u.memory_working_set, u.memory_rss, u.pids) == (
        1_500_000, 1048576, 1048576 - 8192, 4096, 3)
    assert cgroups.oom_kills(str(tmp_path / "gone")) == 0
    assert cgroups.cgroup_dir("/criserver/c1", "/sys/fs/cgroup") == "/sys/fs/cgroup/criserver/c1"
    assert [cgroups.exit_reason(c, o) for c, o in ((0, False), (3, False), (137, True))] == [
        "Completed", "Error", "OOMKilled"]


def test_fastexec_plan_falls_back_for_what_it_cannot_do(tmp_path: Path) -> None:
    vmexec = tmp_path / "vmexec"
    vmexec.write_text("#!/bin/sh\n")
    vmexec.chmod(0o755)
    process = exec_process(SPEC, ["true"], [], "", None)

    def plan(spec: dict[str, object], proc: dict[str, object] = process,
             helper: Path = vmexec) -> fastexec.Plan | None:
        return fastexec.plan(spec, proc, os.getpid(), "/sys/fs/cgroup/criserver/c1", str(helper))

    p = plan(SPEC)
    assert p is not None and not p.seccomp_rules and p.argv == ["true"]
    opts = " ".join(p.options)
    assert "--uid 5 --gid 6 --bounding 20 --effective 20 --permitted 20" in opts
    assert "--no-new-privs" in opts
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW"}
    with_seccomp = plan({**SPEC, "linux": {**SPEC["linux"], "seccomp": seccomp}})
    assert with_seccomp is not None and with_seccomp.seccomp_rules
    for extra in ({"linux": {"namespaces": [{"type": "user"}]}},
                  {"linux": {"seccomp": {**seccomp, "listenerPath": "/run/l.sock"}}},
                  {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}}}):
        assert plan({**SPEC, **extra}) is None
    assert plan(SPEC, {**process, "apparmorProfile": "p"}) is None
    assert plan(SPEC, {**process, "capabilities": {"bounding": ["CAP_NOPE"]}}) is None
    assert plan(SPEC, helper=tmp_path / "missing") is None


def test_seccomp_rules_follow_runc() -> None:
    rules, flags = fastexec.seccomp_rules({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["reboot"], "action": "SCMP_ACT_ERRNO"},  # the default again: skipped
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [
                {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [
                {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"},
                {"index": 1, "value": 3, "op": "SCMP_CMP_NE"}]},
        ]})
    allow, errno = 0x7FFF0000, 0x50000
    assert flags == 2
    assert rules.splitlines() == [
        f"default {errno} 1", "arch x86_64", "arch x86",
        f"rule {allow} 0 read", f"rule {allow} 0 write", f"rule {errno} 13 chmod",
        # Two conditions on one argument: an OR, one rule each.
        f"rule {allow} 0 personality 0 4 0 0", f"rule {allow} 0 personality 0 4 8 0",
        f"rule {allow} 0 clone 0 7 {0x7E020000} 0 1 1 3 0",
    ]


def test_fastexec_report() -> None:
    import struct

    assert fastexec.parse_report(b"P" + struct.pack("<i", 77)) == (77, "")
    err = b"boom"
    data = b"E" + struct.pack("<H", len(err)) + err + b"P" + struct.pack("<i", 5)
    assert fastexec.parse_report(data) == (5, "boom")
    assert fastexec.parse_report(b"") == (0, "")


def test_fastexec_capability_table_matches_the_kernel() -> None:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert len(fastexec.CAPS) >= last + 1


# --- user namespaces ------------------------------------------------------------------------

USERNS_SPEC = {
    **SPEC,
    "mounts": [*SPEC["mounts"],  # type: ignore[list-item]
               {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"]}],
    "linux": {**SPEC["linux"],  # type: ignore[dict-item]
              "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
              "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 65536}],
              "gidMappings": [{"containerID": 0, "hostID": 2000, "size": 65536}]},
}


def test_spec_id_maps() -> None:
    maps = spec_id_maps(USERNS_SPEC)
    assert maps is not None
    assert maps.uid_map() == "0 1000 65536\n" and maps.gid_map() == "0 2000 65536\n"
    assert maps.root() == (1000, 2000)
    assert spec_id_maps(SPEC) is None


@pytest.mark.parametrize("linux", [
    {"namespaces": [{"type": "user", "path": "/proc/1/ns/user"}]},  # the agent's to choose
    {"namespaces": [{"type": "user"}]},  # no mappings
    {"namespaces": [{"type": "user"}], "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
     "uidMappings": [{"containerID": 1, "hostID": 1000, "size": 10}]},  # root unmapped
    {"namespaces": [{"type": "user"}], "gidMappings": [{"containerID": 0, "hostID": 1, "size": 1}],
     "uidMappings": [{"containerID": 0, "hostID": 2**32 - 1, "size": 10}]},  # overflow
])
def test_spec_id_maps_rejects(linux: dict[str, object]) -> None:
    with pytest.raises(GRPCError) as err:
        spec_id_maps({"linux": linux})
    assert err.value.status == Status.INVALID_ARGUMENT


def test_complete_spec_joins_the_pods_user_namespace() -> None:
    pod = PodContext(shm="/run/criserver/shm", ipc_uts_pid=42, userns_pid=42)
    out = complete_spec(USERNS_SPEC, container_id="c1", rootfs="/r", pod=pod)
    ns = {n["type"]: n.get("path") for n in out["linux"]["namespaces"]}
    assert ns["user"] == "/proc/42/ns/user" and ns["ipc"] == "/proc/42/ns/ipc"
    assert out["linux"]["uidMappings"] == USERNS_SPEC["linux"]["uidMappings"]  # type: ignore[index]
    # No sysfs of its own without a network namespace of the pod's user namespace.
    sys_mount = next(m for m in out["mounts"] if m["destination"] == "/sys")
    assert sys_mount == {"destination": "/sys", "type": "bind", "source": "/sys",
                         "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev", "ro"]}
    # Without a user namespace the spec's sysfs stays.
    plain = complete_spec({**USERNS_SPEC, "linux": SPEC["linux"]}, container_id="c1",
                          rootfs="/r", pod=POD)
    assert next(m for m in plain["mounts"] if m["destination"] == "/sys")["type"] == "sysfs"


async def test_a_pods_containers_join_the_vms_ipc_and_uts_namespaces() -> None:
    """Without a user namespace, nothing is started: the agent's namespaces are the VM's,
    which SetupSandbox made the pod's. A pod's containers cannot then ask for one."""
    podns = PodNamespaces(Reaper(asyncio.get_running_loop()), vmexec="/nonexistent/vmexec")
    assert await podns.ipc_uts() == os.getpid()
    assert await podns.ipc_uts() == os.getpid()
    assert podns.holder_pid == 0
    with pytest.raises(GRPCError) as refused:
        await podns.ipc_uts(IdMaps(uids=((0, 1000, 65536),), gids=((0, 1000, 65536),)))
    assert refused.value.status == Status.FAILED_PRECONDITION
    assert podns.holder_pid == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="idmapped mounts need root")
def test_idmapped_clone_shifts_owners(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "file").write_text("x")
    holder = subprocess.Popen(["unshare", "--user", "--", "sleep", "30"])
    try:
        ns = f"/proc/{holder.pid}/ns/user"
        for _ in range(200):  # until unshare(2) ran and sleep is exec'd
            if Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        write_maps(holder.pid, IdMaps(uids=((0, 1000, 65536),), gids=((0, 2000, 65536),)))
        idmapped_clone(str(source), str(target), ns)
        try:
            st = (target / "file").stat()
            assert (st.st_uid, st.st_gid) == (1000, 2000)
            assert (source / "file").stat().st_uid == 0
        finally:
            mountutil.umount(str(target), mountutil.MNT_DETACH)
    finally:
        holder.kill()
        holder.wait()


def _image_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"\x7fELF")
    (root / "bin/sleep").symlink_to("busybox")  # a relative link, as in images
    (root / "bin/escape").symlink_to("/etc/passwd")  # absolute: the guest's, not the image's
    (root / "usr/local/bin/app").write_bytes(b"#!/bin/sh\n")
    (root / "work").mkdir()
    (root / "work/run.sh").write_bytes(b"#!/bin/sh\n")


def test_the_executable_to_read_ahead_is_found_as_the_runtime_would(tmp_path: Path) -> None:
    _image_tree(tmp_path)
    busybox = str(tmp_path / "bin/busybox")
    assert executable_in_rootfs(str(tmp_path), {"args": ["sleep", "1"]}) == busybox
    assert executable_in_rootfs(str(tmp_path), {"args": ["/bin/sleep"]}) == busybox
    assert executable_in_rootfs(str(tmp_path), {"args": ["app"], "env": ["PATH=/usr/local/bin"]}) \
        == str(tmp_path / "usr/local/bin/app")
    assert executable_in_rootfs(str(tmp_path), {"args": ["app"], "env": ["PATH=/bin"]}) is None
    assert executable_in_rootfs(str(tmp_path), {"args": ["./run.sh"], "cwd": "/work"}) \
        == str(tmp_path / "work/run.sh")


def test_an_executable_that_leads_out_of_the_rootfs_is_not_read(tmp_path: Path) -> None:
    _image_tree(tmp_path)
    assert executable_in_rootfs(str(tmp_path), {"args": ["/bin/escape"]}) is None
    assert executable_in_rootfs(str(tmp_path), {"args": ["../../../etc/passwd"]}) is None
    assert executable_in_rootfs(str(tmp_path), {"args": ["missing"]}) is None
    assert executable_in_rootfs(str(tmp_path), {"args": ["/bin"]}) is None  # a directory
    assert executable_in_rootfs(str(tmp_path), {"args": []}) is None


def test_read_ahead_reads_until_told_to_stop(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from vmagent import rootfs

    big = tmp_path / "big"
    big.write_bytes(b"x" * (3 * rootfs.READ_AHEAD_CHUNK))
    stop = threading.Event()
    read_ahead(str(big), stop)  # all of it: returns once read
    read_ahead(str(tmp_path / "missing"), stop)  # only a hint: no error
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        stop.set()  # StartContainer came while the first chunk was read
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    read_ahead(str(big), stop)
    assert reads == [rootfs.READ_AHEAD_CHUNK - 1]


def test_read_ahead_of_a_huge_executable_reads_only_its_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from vmagent import rootfs

    chunk = rootfs.READ_AHEAD_CHUNK
    monkeypatch.setattr(rootfs, "READ_AHEAD_MAX", 2 * chunk)
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (3 * chunk))
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    read_ahead(str(huge), threading.Event())
    assert reads == [chunk - 1, 2 * chunk - 1]
