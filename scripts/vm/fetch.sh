# shellcheck shell=bash
# fetch.sh - QEMU and a Debian kernel for scripts/vm-test.sh, taken from Debian's packages with
# `apt-get download` and `dpkg -x` into the test cache: nothing is installed on the host and no
# host package changes. Sourced after scripts/lib.sh.
#
#   vm_qemu     sets QEMU (the qemu-system-x86_64 to run, a wrapper with LD_LIBRARY_PATH set
#               and -L pointing at the firmware) from $TS_CACHE/vm-qemu
#   vm_kernel   sets KVER, KDIR ($TS_CACHE/vm-kernel-$KVER: the package extracted, plus
#               vmlinux, the uncompressed kernel with its PVH entry, which boots under TCG in
#               about half the time of the bzImage)
#
# The host's qemu-utils may come from backports, so `apt-get install qemu-system-x86` can fail
# on a conflict with qemu-system-common; extracting the packages avoids that and never
# downgrades anything.

# _vm_closure PKG...: PKG and every package it depends on, recursively, that is not installed
# on the host (the first alternative of each dependency; virtual packages resolved by apt).
_vm_closure() {
    local -A seen=()
    local queue=("$@") p d
    while [ ${#queue[@]} -gt 0 ]; do
        p=${queue[0]}; queue=("${queue[@]:1}")
        [ -n "${seen[$p]:-}" ] && continue
        seen[$p]=1
        if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            continue
        fi
        echo "$p"
        # `Depends: <virtual>` lines are followed by the package that provides it.
        while read -r d; do
            queue+=("$d")
        done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                     --no-replaces --no-enhances "$p" 2>/dev/null \
                 | awk '/^ *\|?(Pre)?Depends:/ { dep = 1; sub(/^ *\|?(Pre)?Depends: /, "");
                              if ($0 !~ /^</) { print; dep = 0 }; next }
                        dep && /^    [^ ]/ { print $1; dep = 0; next } { dep = 0 }')
    done
}

_vm_apt_updated=
_vm_apt_update() {
    [ -n "$_vm_apt_updated" ] && return 0
    log "apt-get update (package lists for apt-get download)"
    apt-get update -qq >&2
    _vm_apt_updated=1
}

# _vm_download DIR PKG...: the .debs of PKG... into DIR/debs (kept: a rerun downloads nothing).
_vm_download() {
    local dir=$1; shift
    mkdir -p "$dir/debs"
    # apt drops to _apt for downloads; let it write there (else it warns and goes on as root).
    chown _apt "$dir/debs" 2>/dev/null || true
    ( cd "$dir/debs" && apt-get download -q "$@" >&2 ) \
        || die "apt-get download $* failed"
}

_vm_build_qemu() {
    local final="$TS_CACHE/vm-qemu" tmp pkgs deb
    [ -x "$final/qemu-system-x86_64" ] && return 0
    _ts_remove_stale vm-qemu
    _vm_apt_update
    tmp="$TS_CACHE/vm-qemu.tmp.$$"
    mkdir -p "$tmp/x"
    mapfile -t pkgs < <(_vm_closure qemu-system-x86 qemu-system-data seabios)
    log "apt-get download ${#pkgs[@]} packages for QEMU (not installed): ${pkgs[*]}"
    _vm_download "$tmp" "${pkgs[@]}"
    for deb in "$tmp"/debs/*.deb; do dpkg -x "$deb" "$tmp/x"; done
    # The firmware lives in /usr/share/qemu and /usr/share/seabios (symlinks from the
    # former into the latter are absolute: rewrite them into the extracted tree).
    cat > "$tmp/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU from Debian's packages extracted by scripts/vm/fetch.sh (not installed on the host).
x="$final/x"
LD_LIBRARY_PATH="\$x/usr/lib/x86_64-linux-gnu:\$x/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
    exec "\$x/usr/bin/qemu-system-x86_64" -L "\$x/usr/share/qemu" -L "\$x/usr/share/seabios" "\$@"
WRAP
    chmod 755 "$tmp/qemu-system-x86_64"
    find "$tmp/x/usr/share/qemu" -type l | while read -r l; do
        t=$(readlink "$l")
        case "$t" in /*) ln -sfn "$final/x$t" "$l" ;; esac
    done
    mv -T "$tmp" "$final"
    "$final/qemu-system-x86_64" --version | head -1 >&2 \
        || die "the extracted QEMU does not run (see $final)"
    log "cached $final"
}

vm_qemu() {
    _ts_locked _vm_build_qemu
    QEMU="$TS_CACHE/vm-qemu/qemu-system-x86_64"
}

# The kernel package that linux-image-amd64 names in the machine's bookworm sources.
_vm_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1
}

_vm_build_kernel() {
    local pkg=$1 final=$2 tmp vmlinuz
    [ -f "$final/vmlinux" ] && return 0
    _ts_remove_stale "$(basename "$final")"
    tmp="$final.tmp.$$"
    mkdir -p "$tmp/x"
    log "apt-get download $pkg (not installed)"
    _vm_download "$tmp" "$pkg"
    dpkg -x "$tmp"/debs/*.deb "$tmp/x"
    vmlinuz=$(ls "$tmp"/x/boot/vmlinuz-*)
    python3 "$TS_SCRIPTS/vm/extract-vmlinux.py" "$vmlinuz" "$tmp/vmlinux" \
        || die "could not extract vmlinux from $vmlinuz"
    mv -T "$tmp" "$final"
    log "cached $final"
}

vm_kernel() {
    local pkg
    _vm_apt_update
    pkg=$(_vm_kernel_pkg)
    [ -n "$pkg" ] || die "apt-cache names no linux-image-*-amd64 for linux-image-amd64"
    KVER=${pkg#linux-image-}
    KDIR="$TS_CACHE/vm-kernel-$KVER"
    _ts_locked _vm_build_kernel "$pkg" "$KDIR"
}

# _vm_build_chroot NAME TOOL PACKAGES: $TS_CACHE/NAME-$KVER, a bookworm chroot with PACKAGES
# (no recommends) and the kernel's modules, where an initramfs is built with the stock TOOL
# (its path in the chroot, which marks a finished build) and treeswap's hook or module: the
# host's /boot, initramfs-tools and dracut are never touched. The kernel's files are copied in
# from the extracted package (its postinst never runs).
_vm_build_chroot() (
    set -euo pipefail
    local name=$1 tool=$2 packages=$3
    local final="$TS_CACHE/$name-$KVER" tmp
    [ -x "$final$tool" ] && [ -d "$final/lib/modules/$KVER" ] && exit 0
    _ts_remove_stale "$name-$KVER"
    tmp="$TS_CACHE/$name-$KVER.tmp.$$"
    mounted=()
    umount_all() {
        local i
        for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" || true; done
        mounted=()
    }
    trap umount_all EXIT
    mkdir "$tmp"
    cp -a "$TS_CACHE/bookworm-minbase/." "$tmp/"
    mount -t proc proc "$tmp/proc"; mounted+=("$tmp/proc")
    mount --bind /dev "$tmp/dev"; mounted+=("$tmp/dev")
    printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    log "apt-get install $packages in the chroot $tmp"
    chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages" >&2
    umount_all
    rm -f "$tmp/usr/sbin/policy-rc.d"
    # Copied from the extracted package, not extracted over the tree: dpkg -x would replace
    # the merged-/usr symlink /lib with a directory.
    mkdir -p "$tmp/usr/lib/modules"
    cp -a "$KDIR/x/lib/modules/$KVER" "$tmp/usr/lib/modules/"
    cp -a "$KDIR/x/boot/." "$tmp/boot/"
    chroot "$tmp" depmod "$KVER"
    mv -T "$tmp" "$final"
    log "cached $final"
)

vm_builder() {
    bookworm_tree > /dev/null
    _ts_locked _vm_build_chroot vm-builder /usr/sbin/mkinitramfs "initramfs-tools busybox zstd"
    BUILDER="$TS_CACHE/vm-builder-$KVER"
}

# dmsetup for the power-cut recording inside the VM (the test trees are minbase, without it):
# the packages extracted into the cache; the job disk carries the binary and its library.
_vm_build_dmsetup() {
    local final="$TS_CACHE/vm-dmsetup" tmp deb
    [ -x "$final/x/sbin/dmsetup" ] || [ -x "$final/x/usr/sbin/dmsetup" ] && return 0
    _ts_remove_stale vm-dmsetup
    _vm_apt_update
    tmp="$TS_CACHE/vm-dmsetup.tmp.$$"
    mkdir -p "$tmp/x"
    log "apt-get download dmsetup libdevmapper1.02.1 (not installed)"
    _vm_download "$tmp" dmsetup libdevmapper1.02.1
    for deb in "$tmp"/debs/*.deb; do dpkg -x "$deb" "$tmp/x"; done
    mv -T "$tmp" "$final"
}

# vm_dmsetup DIR: DIR/dmsetup and DIR/lib/libdevmapper.so.* for the guest.
vm_dmsetup() {
    _ts_locked _vm_build_dmsetup
    local x="$TS_CACHE/vm-dmsetup/x"
    mkdir -p "$1/lib"
    cp "$(ls "$x"/sbin/dmsetup "$x"/usr/sbin/dmsetup 2>/dev/null | head -1)" "$1/dmsetup"
    cp -a "$x"/lib/x86_64-linux-gnu/libdevmapper.so.* "$1/lib/" 2>/dev/null \
        || cp -a "$x"/usr/lib/x86_64-linux-gnu/libdevmapper.so.* "$1/lib/"
}

vm_dracut_builder() {
    bookworm_tree > /dev/null
    # dracut instead of initramfs-tools (they conflict): the dracut variant of the initramfs,
    # with the 90treeswap module.
    _ts_locked _vm_build_chroot vm-dracut-builder /usr/bin/dracut "dracut-core busybox zstd"
    BUILDER="$TS_CACHE/vm-dracut-builder-$KVER"
}
