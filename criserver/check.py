"""`criserver check`: one pass/fail line per host prerequisite, each failure with its fix."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from criserver.backends.microvm.backend import MicroVMOptions
from criserver.backends.runc.backend import RuncOptions
from criserver.config import Config, build_options


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def check_qemu(options: MicroVMOptions) -> Result:
    path = shutil.which(options.qemu_binary)
    if path is None:
        return Result("QEMU", False, f"{options.qemu_binary} not found",
                      "apt-get install qemu-system-x86")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return Result("QEMU", version.returncode == 0, version.stdout.splitlines()[0] if
                  version.stdout else version.stderr.strip())


def check_assets(options: MicroVMOptions) -> Result:
    from criserver.vm import assets

    try:
        found = assets.load(Path(options.assets_dir))
        found.verify(full=True)
    except assets.AssetsError as exc:
        return Result("guest assets", False, exc.message, "make guest")
    return Result("guest assets", True,
                  f"{found.path} (kernel {found.kernel_release}), checksums verified")


def check_accelerator(config: Config, options: MicroVMOptions) -> Result:
    from criserver.vm import accel, assets

    try:
        found: assets.GuestAssets | None = assets.load(Path(options.assets_dir))
    except assets.AssetsError:
        found = None
    state = Path(config.daemon.state)  # where the daemon's VMHost keeps the verdict
    chosen = accel.cached(state, options.qemu_binary)
    if chosen is None and accel.probing(state):
        # The daemon probes in the background after it starts; its verdict is cached.
        return Result("accelerator", False, "probing: a KVM probe boot is running, pods wait "
                      "for its verdict", f"run criserver check again within "
                      f"{accel.PROBE_TIMEOUT:.0f}s", required=False)
    if chosen is None:
        chosen = asyncio.run(accel.detect(state, found, qemu_binary=options.qemu_binary))
    if chosen.name == "kvm":
        return Result("accelerator", True, f"KVM: {chosen.reason}")
    return Result("accelerator", True, f"TCG (software emulation, slow): {chosen.reason}",
                  required=False)


def check_vsock() -> Result:
    if os.path.exists("/dev/vhost-vsock"):
        return Result("vhost-vsock", True, "/dev/vhost-vsock present: agent over vsock")
    return Result("vhost-vsock", False, "/dev/vhost-vsock missing: the agent uses virtio-serial",
                  "modprobe vhost_vsock (optional: virtio-serial works without it)",
                  required=False)


def check_cni(config: Config) -> Result:
    wanted = ("bridge", "host-local", "portmap", "loopback")
    for directory in config.network.cni_bin_dirs:
        if all(os.access(Path(directory, p), os.X_OK) for p in wanted):
            return Result("CNI plugins", True, f"{', '.join(wanted)} in {directory}")
    return Result("CNI plugins", False,
                  f"{', '.join(wanted)} not all found in {', '.join(config.network.cni_bin_dirs)}",
                  "apt-get install containernetworking-plugins")


def check_cgroups() -> Result:
    mounts = Path("/proc/mounts").read_text()
    kinds = sorted({line.split()[2] for line in mounts.splitlines()
                    if line.split()[2] in ("cgroup", "cgroup2")})
    if kinds:
        return Result("cgroups", True, f"mounted: {', '.join(kinds)}")
    return Result("cgroups", False, "no cgroup filesystem mounted", "mount -t cgroup2 none "
                  "/sys/fs/cgroup")


def check_kvm_device() -> Result:
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Result("/dev/kvm", True, "present (a boot probe decides whether it is usable)",
                      required=False)
    return Result("/dev/kvm", False, "missing or not accessible: pods run under TCG",
                  "enable virtualisation (or nested virtualisation) for this host",
                  required=False)


def check_ksm(options: MicroVMOptions) -> Result:
    from criserver.vm import ksm

    state = ksm.state()
    if state == "on":
        return Result("KSM", True, "on: identical guest pages are shared between pods")
    hint = ("the daemon turns it on at start (ksm = true)" if options.ksm
            else "echo 1 > /sys/kernel/mm/ksm/run, or ksm = true in the microvm options")
    return Result("KSM", False, f"{state}: each pod's VM keeps its own copy of identical pages "
                  "(~80 MiB more per idle pod)", hint, required=False)


def filesystem_of(path: Path, mounts: str | None = None) -> tuple[str, str]:
    """The mount point holding `path` (which need not exist yet) and its filesystem type."""
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    path = Path(os.path.abspath(path))
    best = ("/", "")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes blanks in mount points as octal: "\040".
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best[0]):
            best = (point, fields[2])  # the last of stacked mounts is the visible one
    return best


def check_templates_dir(config: Config, options: MicroVMOptions) -> Result:
    if not options.templates:
        return Result("templates dir", True, "pod VM templates are off", required=False)
    # As the backend places it (its state dir is <daemon state>/runtimes/<handler>).
    directory = Path(options.templates_dir or
                     Path(config.daemon.state) / "runtimes" / "microvm" / "templates")
    point, fstype = filesystem_of(directory)
    if fstype == "tmpfs":
        return Result("templates dir", True, f"{directory} is on a tmpfs ({point})")
    return Result(
        "templates dir", False,
        f"{directory} is on {fstype or 'an unknown filesystem'} ({point}), not a tmpfs: each "
        "template's guest RAM is written to disk and read back from it",
        f"mkdir -p {directory} && mount -t tmpfs -o mode=0700 tmpfs {directory} (and add it to "
        "/etc/fstab), or set "
        "runtimes.microvm.options.templates_dir to a directory on a tmpfs such as /dev/shm",
        required=False)


def check_runc(options: RuncOptions) -> Result:
    from criserver.backends.runc.runc import find_runc

    path = find_runc(options.runc)
    if not path:
        return Result("runc", False, f"{options.runc or 'runc'} not found", "apt-get install runc")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return Result("runc", version.returncode == 0, f"{path}: " + (
        version.stdout.splitlines()[0] if version.stdout else version.stderr.strip()))


def check_ctrmon(options: RuncOptions) -> Result:
    from criserver.backends.runc.monitor import check_ctrmon as probe
    from criserver.errors import CriError

    try:
        version = asyncio.run(probe(options.monitor))
    except CriError as exc:
        return Result("ctrmon", False, exc.message, "make ctrmon")
    return Result("ctrmon", True, f"{options.monitor}: {version}")


def run_checks(config: Config) -> int:
    """Print the checks; exit status 1 when a required one fails."""
    handler = config.runtimes.get("microvm")
    options: MicroVMOptions = (
        build_options(MicroVMOptions, handler.options, "runtimes.microvm.options")
        if handler else MicroVMOptions()
    )
    checks: list[Callable[[], Result]] = [
        lambda: check_qemu(options),
        check_kvm_device,
        lambda: check_accelerator(config, options),
        check_vsock,
        lambda: check_assets(options),
        lambda: check_cni(config),
        check_cgroups,
        lambda: check_ksm(options),
        lambda: check_templates_dir(config, options),
    ]
    for name, handler_config in config.runtimes.items():
        if handler_config.backend == "runc":
            runc_options: RuncOptions = build_options(RuncOptions, handler_config.options,
                                                      f"runtimes.{name}.options")
            checks += [lambda o=runc_options: check_runc(o),  # type: ignore[misc]
                       lambda o=runc_options: check_ctrmon(o)]  # type: ignore[misc]
            break
    failed = False
    for check in checks:
        try:
            result = check()
        except Exception as exc:  # a check that crashes is a failed check, not a crash
            result = Result(getattr(check, "__name__", "check"), False, repr(exc))
        mark = "ok  " if result.ok else ("FAIL" if result.required else "warn")
        print(f"[{mark}] {result.name}: {result.detail}")
        if not result.ok and result.fix:
            print(f"       fix: {result.fix}")
        failed |= result.required and not result.ok
    return 1 if failed else 0
