"""The IronCore OS image the machine tests boot, built here from the host's Debian kernel (the one
the guest build uses, guest/build.py) and busybox, and pushed to a test registry as an OCI image
manifest with the osboot media types (how Debian's docker-registry stores such images).

Layers: kernel (the uncompressed vmlinux: QEMU boots it through its PVH note, ~3x faster under
TCG than the XZ bzImage), initramfs (busybox, a few modules, /init below) and disk.img (a small
raw ext4, made with `mke2fs -d`, holding DISK_MARKER). Machines boot it with -kernel/-initrd;
disk.img becomes the root `local_disk` (copy-on-write) and is mounted read-only by /init.
The `disk_only` variant has a single layer, a bootable disk.img (MBR, syslinux on FAT16, the
bzImage and the same initramfs) that machines boot through firmware (SeaBIOS): ~7 s here.
Kernel and initramfs are byte-identical between builds; the disk images carry build-time
timestamps (ext4 ctimes, mtools), so builds are cached per input hash instead.

What the console shows, in order (ttyS0, `console=ttyS0` on the command line):
    IRI-TEST-OS READY hostname=<name> ignition=<bytes> disk=<vda, vda1 (bootable) or none>
then the prompt PROMPT of a shell that reads commands from the console (busybox line editing:
it echoes what is typed and asks the terminal for the cursor, ESC[6n, before each prompt), e.g.
`cat /sys/block/vdb/size`, `cat /sys/class/net/eth1/address`, `cat /run/ignition.json`.
The hostname comes from `systemd.hostname=` or `hostname=` on the command line, else from the
fw_cfg file HOSTNAME_FW_CFG; the Ignition data from IGNITION_FW_CFG (the driver's names).
The ACPI power button powers the guest off at once (graceful Delete / power off).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from criserver.image import osboot
from criserver.machine.driver import HOSTNAME_FW_CFG, IGNITION_FW_CFG
from guest import build as guestbuild
from tests.image.oci import OCI_INDEX, OCI_MANIFEST, Pusher, sha

MARKER = "IRI-TEST-OS READY"
PROMPT = "iri-test# "
IGNITION_PATH = "/run/ignition.json"
DISK_MARKER = "iri-test-os disk v1"
COMMAND_LINE = "console=ttyS0 panic=-1 quiet cryptomgr.notests"
# Built images are kept here between sessions, one directory per input hash.
CACHE_DIR = Path("/var/tmp/criserver-test-osimage")
# Leaves only: their dependencies come from modules.dep. qemu_fw_cfg: Ignition and hostname;
# button + evdev: the ACPI power button; ext4, vfat and its code pages: mounting disk.img.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "qemu_fw_cfg", "ext4", "button", "evdev",
           "vfat", "nls_cp437", "nls_ascii", "nls_utf8")
# The bootable disk.img (for firmware boot): MBR + one FAT16 partition from sector 2048.
BOOT_DISK_BYTES = 32 << 20
PART_START = 2048
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
MTIME = 1_600_000_000

INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /mnt/disk
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /etc/modules
# Hot-added disks and NICs need nothing more: the kernel makes their /sys entries and
# devtmpfs their /dev nodes (this kernel has no uevent helper for mdev anyway).
fw=/sys/firmware/qemu_fw_cfg/by_name
host=
read -r cmdline < /proc/cmdline
for w in $cmdline; do
    case "$w" in systemd.hostname=*|hostname=*) host=${w#*=} ;; esac
done
if [ -z "$host" ] && [ -r "$fw/@HOSTNAME@/raw" ]; then host=$(cat "$fw/@HOSTNAME@/raw"); fi
[ -n "$host" ] && hostname "$host"
ign=0
if [ -r "$fw/@IGNITION@/raw" ]; then
    cat "$fw/@IGNITION@/raw" > @IGNITION_PATH@
    ign=$(wc -c < @IGNITION_PATH@)
fi
disk=none
for d in /dev/vd*; do
    [ -b "$d" ] || continue
    for t in ext4 vfat; do
        mount -t $t -o ro "$d" /mnt/disk 2>/dev/null || continue
        if [ -f /mnt/disk/etc/iri-test-os ]; then disk=${d#/dev/}; break 2; fi
        umount /mnt/disk
    done
done
ip link set lo up
# The ACPI power button: power off at once (no init system to ask).
for i in /sys/class/input/input*; do
    if [ "$(cat "$i/name" 2>/dev/null)" = "Power Button" ]; then
        for e in "$i"/event*; do
            [ -e "$e" ] && (head -c 1 "/dev/input/${e##*/}" >/dev/null && poweroff -f) &
        done
    fi
done
echo "@MARKER@ hostname=$(hostname) ignition=$ign disk=$disk"
export PS1='@PROMPT@' HOME=/ TERM=dumb
exec setsid cttyhack sh
"""


@dataclass(frozen=True)
class OsImageFiles:
    kernel: Path
    initramfs: Path
    disk: Path
    boot_disk: Path  # bootable through firmware: syslinux, the bzImage and the initramfs
    kernel_release: str

    def config_bytes(self) -> bytes:
        return json.dumps({"commandLine": COMMAND_LINE}, sort_keys=True).encode()


def init_script() -> str:
    return (INIT.replace("@HOSTNAME@", HOSTNAME_FW_CFG).replace("@IGNITION@", IGNITION_FW_CFG)
            .replace("@IGNITION_PATH@", IGNITION_PATH).replace("@MARKER@", MARKER)
            .replace("@PROMPT@", PROMPT))


def kernel_release() -> str:
    """The release the guest build would use (its default flavour, newest installed)."""
    return guestbuild._find_kernel(guestbuild.BuildConfig(assets_dir=CACHE_DIR))


def build(cache_dir: Path = CACHE_DIR) -> OsImageFiles:
    """Build the image files, or reuse the ones built from the same inputs."""
    release = kernel_release()
    bzimage = Path("/boot") / f"vmlinuz-{release}"
    busybox = Path("/bin/busybox")
    key = hashlib.sha256(json.dumps([
        release, bzimage.stat().st_size, bzimage.stat().st_mtime_ns,
        busybox.stat().st_size, busybox.stat().st_mtime_ns, init_script(), MODULES, DISK_MARKER,
        COMMAND_LINE, BOOT_DISK_BYTES,
    ]).encode()).hexdigest()[:16]
    out = cache_dir / key
    files = OsImageFiles(out / "vmlinux", out / "initramfs.cpio", out / "disk.img",
                         out / "boot-disk.img", release)
    if all(p.is_file() for p in (files.kernel, files.initramfs, files.disk, files.boot_disk)):
        return files
    cache_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        (stage / "vmlinux").write_bytes(guestbuild.extract_vmlinux(bzimage))
        (stage / "initramfs.cpio").write_bytes(_initramfs(release, busybox))
        _disk_img(stage / "disk.img")
        _boot_disk_img(stage / "boot-disk.img", bzimage, stage / "initramfs.cpio")
        try:
            stage.rename(out)
        except OSError:  # another session built it meanwhile
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for old in cache_dir.iterdir():  # builds from older inputs
        if old.name != key and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return files


def _initramfs(release: str, busybox: Path) -> bytes:
    modules_dir = Path("/lib/modules") / release
    groups, files = guestbuild.resolve_modules(modules_dir, {"boot": MODULES})
    c = guestbuild.Cpio()
    for d in ("bin", "dev", "proc", "sys", "etc", "lib", "lib/modules", "run", "tmp", "mnt"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            c.symlink(f"bin/{applet}", "busybox")
    c.file("init", init_script().encode(), 0o755)
    names = groups.get("boot", [])
    c.file("etc/modules", "".join(f"{n}\n" for n in names).encode())
    for name in names:
        c.file(f"lib/modules/{name}.ko", files[name].read_bytes())
    return c.finish()


def _disk_img(path: Path) -> None:
    root = path.parent / "disk-root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "iri-test-os").write_text(f"{DISK_MARKER}\n")
    (root / "etc" / "os-release").write_text("ID=iri-test\nNAME=\"criserver IRI test OS\"\n")
    for p in (root / "etc" / "iri-test-os", root / "etc" / "os-release", root / "etc", root):
        os.utime(p, (MTIME, MTIME))
    # Fixed UUID, hash seed and time: the same bytes (and digest) on every build.
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(MTIME)}
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-L", "iri-test-os",
                    "-U", "6b1f0e3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
                    "-E", "root_owner=0:0,hash_seed=6b1f0e3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
                    "-d", str(root), str(path), "8M"], check=True, capture_output=True, env=env)
    shutil.rmtree(root)


def _boot_disk_img(path: Path, bzimage: Path, initramfs: Path) -> None:
    """A disk SeaBIOS boots: syslinux's MBR, one FAT16 partition with syslinux, the kernel
    (bzImage: syslinux loads no ELF), the initramfs and the marker. All through mtools and
    syslinux's mtools installer: nothing is mounted."""
    work = path.parent / "boot-work"
    work.mkdir()
    part = work / "part.img"
    with open(part, "wb") as f:
        f.truncate(BOOT_DISK_BYTES - PART_START * 512)
    config = work / "syslinux.cfg"
    config.write_text(f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n"
                      f"  INITRD initrd\n  APPEND {COMMAND_LINE}\n")
    marker = work / "iri-test-os"
    marker.write_text(f"{DISK_MARKER}\n")
    for p in (config, marker):
        os.utime(p, (MTIME, MTIME))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(MTIME)}

    def run(*argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True, env=env)

    run("mkfs.fat", "-F", "16", "-n", "IRITEST", "-i", "1a2b3c4d", "--invariant", str(part))
    run("mmd", "-i", str(part), "::etc")
    run("mcopy", "-m", "-i", str(part), str(bzimage), "::vmlinuz")
    run("mcopy", "-m", "-i", str(part), str(initramfs), "::initrd")
    run("mcopy", "-m", "-i", str(part), str(config), "::syslinux.cfg")
    run("mcopy", "-m", "-i", str(part), str(marker), "::etc/iri-test-os")
    run("syslinux", "--install", str(part))
    # The MBR: syslinux's boot code, one active FAT16 (LBA) partition; CHS fields unused.
    sectors = (BOOT_DISK_BYTES // 512) - PART_START
    entry = bytes([0x80, 0xFE, 0xFF, 0xFF, 0x0E, 0xFE, 0xFF, 0xFF]) + \
        PART_START.to_bytes(4, "little") + sectors.to_bytes(4, "little")
    mbr = SYSLINUX_MBR.read_bytes()[:440].ljust(446, b"\0") + entry + bytes(48) + b"\x55\xaa"
    with open(path, "wb") as out, open(part, "rb") as src:
        out.write(mbr.ljust(PART_START * 512, b"\0"))
        shutil.copyfileobj(src, out, 1 << 20)
    shutil.rmtree(work)


# -- the OCI image -----------------------------------------------------------------------------


def layers_of(files: OsImageFiles, disk_only: bool = False) -> list[tuple[str, bytes]]:
    """(media type, blob) of each layer, in manifest order. `disk_only`: just the bootable
    disk.img, which machines boot through firmware."""
    if disk_only:
        return [(osboot.DISK, files.boot_disk.read_bytes())]
    return [(osboot.KERNEL, files.kernel.read_bytes()),
            (osboot.INITRAMFS, files.initramfs.read_bytes()),
            (osboot.DISK, files.disk.read_bytes())]


def manifest_bytes(config: bytes, layers: list[tuple[str, bytes]]) -> bytes:
    """An OCI image manifest with the osboot config and layer media types."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": osboot.CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": media, "digest": sha(blob), "size": len(blob)}
                   for media, blob in layers],
    }).encode()


def index_bytes(manifest: bytes, architecture: str = "amd64") -> bytes:
    """An OCI index naming `manifest` as an osboot artifacts manifest (the spec's shape)."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": osboot.ARTIFACTS_MANIFEST, "digest": sha(manifest),
                       "size": len(manifest), "platform": {"architecture": architecture,
                                                           "os": "linux"},
                       "annotations": {"variant": "virtualization",
                                       "architecture": architecture}}],
    }).encode()


async def push(session: aiohttp.ClientSession, base: str, repo: str, tag: str,
               files: OsImageFiles, authorization: str | None = None,
               as_index: bool = False, disk_only: bool = False) -> str:
    """Push the image to the registry at `base`; returns the digest `tag` names (the manifest,
    or with `as_index` an index over it). `disk_only`: the firmware-booted variant."""
    pusher = Pusher(session, base, authorization)
    config = files.config_bytes()
    layers = layers_of(files, disk_only)
    await pusher.blob(repo, config)
    for _, blob in layers:
        await pusher.blob(repo, blob)
    manifest = manifest_bytes(config, layers)
    if not as_index:
        return await pusher.manifest(repo, tag, manifest, OCI_MANIFEST)
    await pusher.manifest(repo, sha(manifest), manifest, OCI_MANIFEST)
    return await pusher.manifest(repo, tag, index_bytes(manifest), OCI_INDEX)
