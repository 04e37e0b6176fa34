#!/bin/sh
# Builds what the critest images (tests/conformance/images.py) are made of, into a cache dir:
#   busybox-1.35.0/busybox   a full static busybox (defconfig) from Debian's source package
#   nginx/root/              Debian's nginx binary, its loader and shared libraries, mime.types
#   bin/pause, bin/nnp       tiny static C programs (the pause image, the nonewprivs image)
# Only Debian packages and sources are fetched, through apt with a private sources list and
# private lists/cache dirs (the system's apt configuration and state are left alone). Each step
# is skipped when its result exists: delete it to rebuild.
#
# usage: build-assets.sh [CACHE_DIR]   (default: .cache/conformance in the repository)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${1:-$HERE/../../.cache/conformance}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
APT_DIR=$CACHE/apt
BUSYBOX_VERSION=1.35.0
SUITE=bookworm

log() { echo "build-assets: $*" >&2; }

apt_private() {
    apt-get -q \
        -o Dir::Etc::SourceList="$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$APT_DIR/lists" -o Dir::Cache="$APT_DIR/cache" \
        -o Acquire::Languages=none -o APT::Sandbox::User=root "$@"
}

# Fetched once per cache dir: stable `bookworm main` only (no -updates, no -security), so the
# package versions, and with them the image digests, move only at Debian point releases.
apt_lists() {
    [ -f "$APT_DIR/updated" ] && return 0
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    printf 'deb http://deb.debian.org/debian %s main\ndeb-src http://deb.debian.org/debian %s main\n' \
        "$SUITE" "$SUITE" >"$APT_DIR/sources.list"
    log "apt-get update (private lists in $APT_DIR)"
    apt_private update >"$APT_DIR/update.log" 2>&1 || { cat "$APT_DIR/update.log" >&2; exit 1; }
    touch "$APT_DIR/updated"
}

build_busybox() {
    out=$CACHE/busybox-$BUSYBOX_VERSION
    [ -x "$out/busybox" ] && return 0
    apt_lists
    rm -rf "$out" && mkdir -p "$out/dl"
    log "busybox: fetching Debian's source package"
    (cd "$out/dl" && apt_private source --download-only busybox >../fetch.log 2>&1) \
        || { cat "$out/fetch.log" >&2; exit 1; }
    dsc=$(ls "$out/dl"/busybox_"$BUSYBOX_VERSION"-*.dsc 2>/dev/null | head -n1)
    [ -n "$dsc" ] || { log "busybox: $SUITE does not ship busybox $BUSYBOX_VERSION"; exit 1; }
    # apt verified the files against the signed Sources index: no keyring check here.
    dpkg-source --no-check -x "$dsc" "$out/src" >"$out/build.log" 2>&1
    log "busybox: make defconfig, CONFIG_STATIC=y, make (a minute or two)"
    start=$(date +%s)
    (
        cd "$out/src"
        # No build date in the banner: the binary is the same on every build.
        export KCONFIG_NOTIMESTAMP=1
        make defconfig
        sed -i -e 's/^# CONFIG_STATIC is not set$/CONFIG_STATIC=y/' \
            -e 's/^CONFIG_EXTRA_CFLAGS=.*/CONFIG_EXTRA_CFLAGS="-Wno-format-truncation -Wno-format-overflow -Wno-return-local-addr -Wno-maybe-uninitialized"/' \
            .config
        grep -qx 'CONFIG_STATIC=y' .config
        make oldconfig </dev/null
        make -j"$(nproc)"
    ) >>"$out/build.log" 2>&1 || { tail -n 40 "$out/build.log" >&2; exit 1; }
    for applet in pgrep ipcs adduser brctl; do
        "$out/src/busybox" --list | grep -qx "$applet" \
            || { log "busybox: the build lacks the applet $applet"; exit 1; }
    done
    cp "$out/src/busybox" "$out/busybox.tmp"
    rm -rf "$out/src"
    mv "$out/busybox.tmp" "$out/busybox"
    log "busybox: built in $(($(date +%s) - start)) s: $out/busybox"
}

# The ELF NEEDED entries of a binary.
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }

# Copies library $1 (found in the extracted packages) into the root, dereferenced, then its own
# dependencies.
copy_lib() {
    local dest src lib
    dest=$ROOT/lib/x86_64-linux-gnu/$1
    [ -e "$dest" ] && return 0
    src=$(find "$PKGS" -name "$1" \( -type f -o -type l \) | head -n1)
    [ -n "$src" ] || { log "nginx: no downloaded package ships $1"; exit 1; }
    cp -L "$src" "$dest"
    for lib in $(needed "$dest"); do copy_lib "$lib"; done
}

build_nginx() {
    out=$CACHE/nginx
    [ -x "$out/root/usr/sbin/nginx" ] && return 0
    apt_lists
    rm -rf "$out" && mkdir -p "$out/debs"
    # nginx, nginx-common (mime.types) and the packages of the libraries nginx links.
    log "nginx: fetching Debian's nginx and its libraries"
    (cd "$out/debs" && apt_private download nginx nginx-common libc6 libcrypt1 libpcre2-8-0 \
        libssl3 zlib1g >../fetch.log 2>&1) || { cat "$out/fetch.log" >&2; exit 1; }
    PKGS=$out/pkgs
    ROOT=$out/root.tmp
    for deb in "$out"/debs/*.deb; do dpkg-deb -x "$deb" "$PKGS"; done
    mkdir -p "$ROOT/usr/sbin" "$ROOT/etc/nginx" "$ROOT/lib64" "$ROOT/lib/x86_64-linux-gnu"
    cp "$PKGS/usr/sbin/nginx" "$ROOT/usr/sbin/nginx"
    cp "$PKGS/etc/nginx/mime.types" "$ROOT/etc/nginx/mime.types"
    interp=$(readelf -l "$ROOT/usr/sbin/nginx" | sed -n 's/.*interpreter: \(.*\)\]$/\1/p')
    [ "$interp" = /lib64/ld-linux-x86-64.so.2 ] || { log "nginx: unexpected loader $interp"; exit 1; }
    # The loader where Debian has it, /lib64 pointing there (libc.so.6 needs it by that name).
    copy_lib ld-linux-x86-64.so.2
    ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOT$interp"
    for lib in $(needed "$ROOT/usr/sbin/nginx"); do copy_lib "$lib"; done
    # The staged binary must start with the staged loader and libraries alone.
    "$ROOT$interp" --library-path "$ROOT/lib/x86_64-linux-gnu" "$ROOT/usr/sbin/nginx" -v \
        >"$out/version" 2>&1 || { cat "$out/version" >&2; exit 1; }
    ls "$out/debs" >"$out/packages"
    rm -rf "$PKGS"
    mv "$ROOT" "$out/root"
    log "nginx: $(cat "$out/version") with $(ls "$out/root/lib/x86_64-linux-gnu" | tr '\n' ' ')"
}

build_c() {
    name=$1
    out=$CACHE/bin/$name
    [ -x "$out" ] && [ "$out" -nt "$HERE/$name.c" ] && return 0
    mkdir -p "$CACHE/bin"
    # Relative source name, no debug info, stripped: the binary does not depend on the paths.
    (cd "$HERE" && gcc -static -Os -s -Wall -Werror -o "$out.tmp" "$name.c")
    mv "$out.tmp" "$out"
    log "$name: built $out"
}

build_busybox
build_nginx
build_c pause
build_c nnp
