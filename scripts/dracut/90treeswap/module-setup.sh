#!/bin/bash
# dracut module 90treeswap: boots the machine from the current treeswap tree. Installs
# treeswap (with its libraries), treeswap-root.sh (the same boot logic as the initramfs-tools
# script) and a mount hook that mounts the root device on $NEWROOT, runs `treeswap boot`
# against the state root and puts the current tree on $NEWROOT instead (treeswap.root=,
# treeswap.path=, treeswap.tries=, ...: see treeswap-root.sh).
# Install: copy this directory (following symlinks: cp -rL) to
# /usr/lib/dracut/modules.d/90treeswap, then `dracut --add treeswap -f`. TREESWAP_BIN names
# the binary to copy (default: treeswap on PATH).

# Only when asked for (--add treeswap, add_dracutmodules+=" treeswap "): it changes what
# the machine boots.
check() {
    return 255
}

depends() {
    echo rootfs-block
    return 0
}

installkernel() {
    # The state root's file system types (the root device's driver is rootfs-block's).
    hostonly='' instmods ext4 xfs btrfs
}

install() {
    local bin=${TREESWAP_BIN:-$(command -v treeswap)} lib
    [ -x "$bin" ] || { derror "treeswap: no treeswap binary (set TREESWAP_BIN)"; return 1; }
    for lib in "$moddir/treeswap-root.sh" /usr/share/treeswap/treeswap-root.sh; do
        [ -f "$lib" ] && break
    done
    [ -f "$lib" ] || { derror "treeswap: no treeswap-root.sh"; return 1; }
    inst_binary "$bin" /usr/sbin/treeswap
    inst_simple "$lib" /usr/share/treeswap/treeswap-root.sh
    inst_multiple cat cp mkdir readlink mount umount tr sed
    # Before rootfs-block's mount-root.sh (mount 99), which would mount the device as the root.
    inst_hook mount 50 "$moddir/treeswap-mount.sh"
}
