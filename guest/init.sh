#!/bin/sh
# criserver guest /init (busybox ash, runs from the initramfs as PID 1).
# Loads the virtio modules named by the kernel command line, mounts the read-only erofs root,
# gives it writable tmpfs mounts and cgroup2, then switch_root's into it and execs the agent.
# Kernel command line keys (all optional):
#   criserver.bus=mmio|pci          virtio transport of the machine (microvm: mmio, q35: pci)
#   criserver.transport=serial|vsock  how the agent reaches the host
#   criserver.modules=a,b           extra module groups (net, overlay, 9p, loop, pvpanic)
#   criserver.probe=1               print the probe marker and reboot at once (accel probe)
#   criserver.init_debug=1          drop to a shell on the console instead of panicking on errors

export PATH=/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
# Boot-relative stamps for the console line below: `read` is a shell builtin (no fork).
read -r t_init _ < /proc/uptime
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev

bus=mmio
transport=serial
extra=
probe=
debug=
pr_order=
read -r cmdline < /proc/cmdline
for w in $cmdline; do
    case "$w" in
        criserver.bus=*) bus=${w#*=} ;;
        criserver.transport=*) transport=${w#*=} ;;
        criserver.modules=*) extra=${w#*=} ;;
        criserver.probe=*) probe=${w#*=} ;;
        criserver.init_debug=*) debug=${w#*=} ;;
        criserver.pr_order=*) pr_order=${w#*=} ;;
    esac
done

if [ -n "$probe" ]; then
    # The accel probe only needs proof that the kernel reached userspace.
    echo "CRISERVER_PROBE_OK"
    reboot -f
fi

fail() {
    echo "criserver-init: FATAL: $*"
    if [ -n "$debug" ]; then exec sh; fi
    # PID 1 exiting panics the kernel: the host sees GUEST_PANICKED (pvpanic) or, without it,
    # a reboot (panic=-1) that QEMU turns into a shutdown.
    exit 1
}

loaded=" "
load_group() {
    [ -f "/etc/modgroups/$1" ] || fail "unknown module group $1"
    while read -r m; do
        case "$loaded" in *" $m "*) continue ;; esac
        insmod "/lib/modules/$m.ko" || echo "criserver-init: insmod $m failed"
        loaded="$loaded$m "
    done < "/etc/modgroups/$1"
}

load_group core
load_group "$bus"
load_group "$transport"
old_ifs=$IFS
IFS=,
for g in $extra; do load_group "$g"; done
IFS=$old_ifs
read -r t_modules _ < /proc/uptime
# Free page reporting (virtio_balloon): the smallest free block the guest reports to the host.
if [ -n "$pr_order" ] && [ -w /sys/module/page_reporting/parameters/page_reporting_order ]; then
    echo "$pr_order" > /sys/module/page_reporting/parameters/page_reporting_order
fi

# The root disk is found by its serial, not its name: extra disks may take vda. virtio probing
# is synchronous in insmod, so the wait (about 1-2 s) only matters on a broken setup.
root=
tries=0
while [ -z "$root" ]; do
    for d in /sys/block/vd*; do
        [ -f "$d/serial" ] || continue
        read -r s < "$d/serial"
        if [ "$s" = criserver-root ]; then root=/dev/${d##*/}; fi
    done
    [ -n "$root" ] && break
    tries=$((tries + 1))
    [ $tries -gt 100 ] && fail "no virtio-blk disk with serial criserver-root"
    sleep 0.01
done

mount -t erofs -o ro "$root" /newroot || fail "cannot mount root $root"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/var
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /newroot/sys/fs/cgroup || fail "cannot mount cgroup2"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts /newroot/dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm

read -r t_exec _ < /newroot/proc/uptime
echo "criserver-init: starting agent root=$root bus=$bus transport=$transport modules=$extra" \
    "init=$t_init modules_loaded=$t_modules exec=$t_exec"
export PATH=/usr/sbin:/usr/bin HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
exec /bin/switch_root /newroot /usr/bin/python3 -m vmagent
