"""The agent's metric readers (vmagent/metrics.py) against a cgroup, /proc and /sys laid out
in a tmp dir: what each file says lands in the right field, and missing files read as zero."""

from __future__ import annotations

import os
from pathlib import Path

from vmagent import metrics

MiB = 1024 * 1024

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     740      10    0    0    0     0          0         0      740      10    0    0    0     0       0          0
  eth0:  123456     321    1    2    0     0          0         0    65432     210    3    4    0     0       0          0
"""  # noqa: E501

MOUNTINFO = """\
22 1 254:0 / / ro,relatime - erofs /dev/vda ro
25 22 0:21 / /run rw,nosuid,nodev - tmpfs tmpfs rw,size=65536k
26 25 0:22 / /run/criserver/shared rw - 9p criserver.shared rw,trans=virtio
"""


def _cgroup(root: Path) -> Path:
    cg = root / "cg"
    cg.mkdir()
    files = {
        "cpu.stat": "usage_usec 3500000\nuser_usec 2000000\nsystem_usec 1500000\n"
                    "nr_periods 40\nnr_throttled 7\nthrottled_usec 2500000\n",
        "memory.stat": "anon 4096000\nfile 8192\nkernel 65536\nfile_mapped 4096\n"
                       "pgfault 1000\npgmajfault 3\ninactive_file 0\n",
        "memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n",
        "memory.current": "5000000\n",
        "memory.peak": "6000000\n",
        "memory.swap.current": "0\n",
        "memory.max": f"{64 * MiB}\n",
        "memory.swap.max": "0\n",
        "memory.low": "0\n",
        "pids.max": "max\n",
        "cpu.max": "20000 100000\n",
        "cpu.weight": "39\n",  # what runc makes of 1024 shares
        "io.stat": "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
        "cgroup.procs": "101\n102\n",
    }
    for name, text in files.items():
        (cg / name).write_text(text)
    return cg


def _proc(root: Path) -> Path:
    proc = root / "proc"
    # 101: two threads, stdin/out on a tty and a socket; 102: one thread, no fds (a zombie).
    for pid, tids in ((101, (101, 103)), (102, (102,))):
        for tid in tids:
            (proc / str(pid) / "task" / str(tid)).mkdir(parents=True)
    fd = proc / "101" / "fd"
    fd.mkdir()
    os.symlink("/dev/pts/0", fd / "0")
    os.symlink("/dev/pts/0", fd / "1")
    os.symlink("socket:[4242]", fd / "3")
    (proc / "101" / "net").mkdir()
    (proc / "101" / "net" / "dev").write_text(NET_DEV)
    (proc / "self").mkdir()
    (proc / "self" / "mountinfo").write_text(MOUNTINFO)
    return proc


def _sys(root: Path) -> Path:
    dev = root / "sys" / "dev" / "block" / "254:0"
    dev.mkdir(parents=True)
    (dev / "uevent").write_text("MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n")
    return root / "sys"


def test_container_details_read_every_file(tmp_path: Path) -> None:
    cg, proc, sys = _cgroup(tmp_path), _proc(tmp_path), _sys(tmp_path)
    layer = tmp_path / "upper"
    layer.mkdir()
    d = metrics.container_details(str(cg), str(layer), str(proc), str(sys))
    assert (d.cpu_user_nanos, d.cpu_system_nanos) == (2 * 10**9, 15 * 10**8)
    assert (d.cpu_periods, d.cpu_throttled_periods, d.cpu_throttled_nanos) == (40, 7, 25 * 10**8)
    assert (d.memory_cache_bytes, d.memory_kernel_bytes, d.memory_mapped_file_bytes) == (
        8192, 65536, 4096)
    assert (d.memory_max_usage_bytes, d.memory_failcnt, d.oom_events) == (6000000, 5, 1)
    assert (d.memory_pgfault, d.memory_pgmajfault, d.memory_swap_bytes) == (1000, 3, 0)
    assert (d.processes, d.threads, d.file_descriptors, d.sockets) == (2, 3, 3, 1)
    assert d.threads_max == 0  # "max": no limit
    assert (d.spec_cpu_quota, d.spec_cpu_period, d.spec_cpu_shares) == (20000, 100000, 998)
    # memory.max plus memory.swap.max, as cAdvisor counts the swap limit
    assert (d.spec_memory_limit_bytes, d.spec_memory_swap_limit_bytes) == (64 * MiB, 64 * MiB)
    assert d.spec_memory_reservation_bytes == 0
    [io] = d.io
    assert (io.device, io.major, io.minor) == ("/dev/vda", 254, 0)
    assert (io.read_bytes, io.write_bytes, io.reads, io.writes) == (4096, 8192, 1, 2)
    st = os.statvfs(layer)
    assert d.fs_limit_bytes == st.f_blocks * st.f_frsize and d.fs_inodes_total == st.f_files
    assert d.fs_inodes_free > 0


def test_a_gone_cgroup_reads_as_zeros(tmp_path: Path) -> None:
    d = metrics.container_details(str(tmp_path / "gone"), "", str(tmp_path), str(tmp_path))
    assert (d.processes, d.threads, d.spec_memory_limit_bytes, len(d.io)) == (0, 0, 0, 0)
    assert d.fs_device == "" and d.fs_limit_bytes == 0


def test_unlimited_cgroup(tmp_path: Path) -> None:
    cg = _cgroup(tmp_path)
    for name, text in (("memory.max", "max\n"), ("cpu.max", "max 100000\n"),
                       ("memory.swap.max", "max\n"), ("pids.max", "1024\n")):
        (cg / name).write_text(text)
    (cg / "memory.peak").unlink()  # Linux < 5.19: the current usage stands in
    d = metrics.container_details(str(cg), "", str(tmp_path), str(tmp_path))
    assert (d.spec_memory_limit_bytes, d.spec_cpu_quota, d.spec_cpu_period) == (0, 0, 100000)
    assert (d.spec_memory_swap_limit_bytes, d.threads_max) == (0, 1024)
    assert d.memory_max_usage_bytes == 5000000


def test_kernel_memory_on_older_kernels() -> None:
    assert metrics.kernel_memory({"kernel": 7, "slab": 100}) == 7
    assert metrics.kernel_memory({"kernel_stack": 1, "pagetables": 2, "slab": 4, "sock": 8,
                                  "anon": 1000}) == 15


def test_shares_of_weight_inverts_runc() -> None:
    # runc: weight = 1 + (shares - 2) * 9999 / 262142
    for shares in (2, 1024, 262144):
        weight = 1 + (shares - 2) * 9999 // 262142
        assert abs(metrics.shares_of_weight(weight) - shares) <= 27
    assert metrics.shares_of_weight(0) == 0


def test_interfaces_skip_loopback(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    [eth0] = metrics.interfaces(101, str(proc))
    assert eth0.name == "eth0"
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (123456, 321, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (65432, 210, 3, 4)
    assert metrics.interfaces(999, str(proc)) == []


def test_mount_source_is_the_longest_mount_point_above() -> None:
    assert metrics.mount_source("/run/criserver/c1/upper", MOUNTINFO) == "tmpfs"
    assert metrics.mount_source("/run/criserver/shared/v", MOUNTINFO) == "criserver.shared"
    assert metrics.mount_source("/usr/bin", MOUNTINFO) == "/dev/vda"
    assert metrics.mount_source("/runner", MOUNTINFO) == "/dev/vda"


def test_device_name_falls_back_to_numbers(tmp_path: Path) -> None:
    sys = _sys(tmp_path)
    assert metrics.device_name(254, 0, str(sys)) == "/dev/vda"
    assert metrics.device_name(8, 16, str(sys)) == "8:16"
