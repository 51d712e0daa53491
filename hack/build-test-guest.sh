#!/usr/bin/env bash
# Build the qemu driver's test guest from Debian packages only:
#   OUTDIR/vmlinuz     the kernel of the installed Debian kernel package (linux-image-amd64)
#   OUTDIR/initrd.img  a gzip'd cpio with busybox-static, the virtio-blk and virtio-net
#                      modules and hack/guest/init (prints "ferry-counter N" every ~100 ms,
#                      dirties memory and disk; with ferry.ip=A on its command line it
#                      puts A on eth0, answers ping and echoes lines on TCP port 7078)
#   OUTDIR/kernel-version
#
# Usage: hack/build-test-guest.sh OUTDIR
# Needs: apt-get install -y --no-install-recommends busybox-static cpio, and either an
# installed kernel (linux-image-amd64) or apt lists to `apt-get download` its package
# (extracted with dpkg-deb, never installed; FERRY_GUEST_KERNEL_DOWNLOAD=1 forces that).
# The result is cached in ${FERRY_CACHE:-~/.cache/ferry}/guest/<kernel version>-<init hash>
# and copied to OUTDIR. FERRY_GUEST_KERNEL_VERSION picks a kernel when several are installed.
set -euo pipefail

OUTDIR="${1:?usage: $0 OUTDIR}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INIT="$HERE/guest/init"
CACHE_ROOT="${FERRY_CACHE:-${HOME:-/root}/.cache/ferry}/guest"

die() { echo "build-test-guest: $*" >&2; exit 1; }

BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then BUSYBOX="$b"; break; fi
done
[ -n "$BUSYBOX" ] || die "no static busybox: apt-get install -y busybox-static"
command -v cpio >/dev/null || die "no cpio: apt-get install -y cpio"

KVER="${FERRY_GUEST_KERNEL_VERSION:-}"
KROOT=""  # where the kernel package's files are: "" (installed in /) or an extracted .deb
if [ -z "$KVER" ]; then
    # newest installed kernel that has both a vmlinuz and its modules
    # shellcheck disable=SC2012  # kernel release names never contain spaces
    for v in $(ls /lib/modules 2>/dev/null | sort -V -r); do
        if [ -r "/boot/vmlinuz-$v" ]; then KVER="$v"; break; fi
    done
fi
DEB_PKG=""
if [ -z "$KVER" ] || [ -n "${FERRY_GUEST_KERNEL_DOWNLOAD:-}" ]; then
    # not installed: take the package linux-image-amd64 points at, without installing it
    command -v apt-cache >/dev/null || die "no kernel installed and no apt: apt-get install -y linux-image-amd64"
    DEB_PKG="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    [ -n "$DEB_PKG" ] || die "no kernel found: apt-get update && apt-get install -y linux-image-amd64"
    KVER="${DEB_PKG#linux-image-}"
fi

KEY="$KVER-$(cat "$INIT" "$0" | sha256sum | cut -c1-12)"
CACHE="$CACHE_ROOT/$KEY"

if [ ! -f "$CACHE/.complete" ]; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    if [ -n "$DEB_PKG" ]; then
        echo "build-test-guest: fetching $DEB_PKG (not installed) with apt-get download" >&2
        (cd "$WORK" && apt-get download -q -o APT::Sandbox::User=root "$DEB_PKG" >/dev/null) || die "apt-get download $DEB_PKG failed"
        mkdir -p "$WORK/kroot"
        dpkg-deb -x "$WORK"/"$DEB_PKG"_*.deb "$WORK/kroot"
        KROOT="$WORK/kroot"
        [ -r "$KROOT/lib/modules/$KVER/modules.dep" ] || depmod -b "$KROOT" "$KVER" 2>/dev/null \
            || die "cannot build modules.dep for $KVER (apt-get install -y kmod)"
    fi
    KERNEL="$KROOT/boot/vmlinuz-$KVER"
    MODDIR="$KROOT/lib/modules/$KVER"
    [ -r "$KERNEL" ] || die "$KERNEL missing or unreadable"
    [ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep missing"
    ROOT="$WORK/root"
    mkdir -p "$ROOT/bin" "$ROOT/lib/modules" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/run" "$ROOT/tmp"
    cp "$BUSYBOX" "$ROOT/bin/busybox"
    cp "$INIT" "$ROOT/init"
    chmod 0755 "$ROOT/init" "$ROOT/bin/busybox"
    # virtio-blk and virtio-net are modules in Debian's kernel: ship it and everything it needs (from
    # modules.dep), flat, with lib/modules/load-order listing them dependencies first.
    ORDER=()
    add_module() { # $1: path relative to $MODDIR
        local rel="$1" dep name
        for seen in "${ORDER[@]:-}"; do [ "$seen" = "$rel" ] && return 0; done
        # shellcheck disable=SC2013  # modules.dep lists space-separated paths without spaces
        for dep in $(grep -E "^$rel:" "$MODDIR/modules.dep" | cut -d: -f2-); do
            add_module "$dep"
        done
        ORDER+=("$rel")
    }
    for m in virtio_pci virtio_blk virtio_net; do
        rel="$(grep -E "(^|/)$m\.ko(\.xz|\.zst|\.gz)?:" "$MODDIR/modules.dep" | head -n1 | cut -d: -f1 || true)"
        if [ -z "$rel" ]; then
            grep -qE "/$m\.ko" "$MODDIR/modules.builtin" 2>/dev/null \
                || die "module $m is neither in modules.dep nor built in ($KVER)"
            continue # built into this kernel
        fi
        add_module "$rel"
    done
    : > "$ROOT/lib/modules/load-order"
    for rel in "${ORDER[@]:-}"; do
        [ -n "$rel" ] || continue
        name="$(basename "$rel")"; name="${name%%.ko*}"
        case "$rel" in
            *.ko) cp "$MODDIR/$rel" "$ROOT/lib/modules/$name.ko" ;;
            *.ko.xz) xz -dc "$MODDIR/$rel" > "$ROOT/lib/modules/$name.ko" ;;
            *.ko.zst) zstd -dc "$MODDIR/$rel" > "$ROOT/lib/modules/$name.ko" ;;
            *.ko.gz) gzip -dc "$MODDIR/$rel" > "$ROOT/lib/modules/$name.ko" ;;
        esac
        echo "$name" >> "$ROOT/lib/modules/load-order"
    done
    mkdir -p "$WORK/out"
    (cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -9 > "$WORK/out/initrd.img"
    cp "$KERNEL" "$WORK/out/vmlinuz"
    echo "$KVER" > "$WORK/out/kernel-version"
    mkdir -p "$CACHE_ROOT"
    rm -rf "$CACHE"
    mv "$WORK/out" "$CACHE"
    touch "$CACHE/.complete"
fi

mkdir -p "$OUTDIR"
for f in vmlinuz initrd.img kernel-version; do
    cp "$CACHE/$f" "$OUTDIR/$f.tmp.$$"
    mv "$OUTDIR/$f.tmp.$$" "$OUTDIR/$f"
done
echo "$OUTDIR/vmlinuz $OUTDIR/initrd.img ($KVER)"
