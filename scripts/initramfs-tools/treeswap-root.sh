# shellcheck shell=sh
# treeswap-root.sh - boots the machine from a treeswap tree. POSIX sh for the initramfs
# (busybox or dash), sourced by the initramfs-tools script (local-bottom/treeswap) and by
# the dracut module (90treeswap); the same file in both.
#
# treeswap_root NEWROOT: NEWROOT is where the initramfs mounted the root device. Then:
#   1. the device holding the state root (treeswap.root=, default the one on NEWROOT) is
#      mounted read-write at /run/treeswap/device (the mount on NEWROOT is moved there);
#   2. `treeswap boot` runs against <device>/<treeswap.path>: it repairs interrupted work,
#      counts the boot and, once a pending tree has used up its tries, flips back (exit 5);
#   3. trees/<V> named by `current` is bind-mounted on NEWROOT, read-only, with each
#      persistent path (treeswap.persist=, default var,home) bind-mounted read-write from
#      <device>/<treeswap.persistdir>/<path> (made from the tree's copy on first boot), and a
#      tmpfs on /tmp;
#   4. /run/treeswap/env names the root, the config and the version for the running system
#      (the initramfs moves /run, and the device mount below it, into the new root).
# The init then switch_roots into NEWROOT as usual.
#
# Kernel command line (nothing happens unless treeswap.root= or treeswap.path= is given):
#   treeswap.root=DEV         the device (a path, LABEL=, UUID=) with the state root
#                             (default: the root device, root=)
#   treeswap.path=DIR         the state root on that device (default /versions)
#   treeswap.tries=N          boot tries of a new tree, overriding the config's [boot] tries
#   treeswap.config=FILE      the config file on that device (default <path>.toml if present)
#   treeswap.persist=A,B      persistent paths (default var,home; "none" for none)
#   treeswap.persistdir=DIR   where they live on the device (default /persist)
#   treeswap=off              leave the root as the initramfs mounted it, even so
#
# Out of scope: the kernel and the initramfs live outside the trees (in /boot, managed by the
# distribution's tools): the boot loader must be able to start them whatever tree is current,
# and a tree that cannot boot must not take the means of booting the other one with it.

TS_RUN=/run/treeswap
TS_DEV=$TS_RUN/device

ts_say() {
    echo "treeswap: $*" >&2
    # The kernel log ends up in the journal of the booted system.
    echo "treeswap: $*" > "${TS_KMSG:-/dev/kmsg}" 2>/dev/null || true
}

# ts_arg NAME DEFAULT: the value of NAME= on the kernel command line, else DEFAULT.
ts_arg() {
    _v=$2
    for _w in $(cat /proc/cmdline); do
        case "$_w" in "$1="*) _v=${_w#"$1="} ;; esac
    done
    echo "$_v"
}

# ts_resolve DEV: a device path for DEV (a path, LABEL=x or UUID=x).
ts_resolve() {
    case "$1" in
        LABEL=* | UUID=*)
            if command -v resolve_device > /dev/null 2>&1; then
                resolve_device "$1"
            elif command -v blkid > /dev/null 2>&1; then
                blkid -l -o device -t "$1" 2>/dev/null || blkid | sed -n "s|^\([^:]*\):.* ${1%%=*}=\"${1#*=}\".*|\1|p" | head -n 1
            else
                findfs "$1"
            fi
            ;;
        *) echo "$1" ;;
    esac
}

# ts_config SRC TRIES DEST: DEST is SRC (or empty) with [boot] tries = TRIES when TRIES is set.
ts_config() {
    : > "$3"
    _in_boot=0 _done=0
    if [ -n "$1" ]; then
        while IFS= read -r _l || [ -n "$_l" ]; do
            case "$_l" in
                \[*)
                    _in_boot=0
                    case "$_l" in \[boot\]*) _in_boot=1 ;; esac
                    ;;
            esac
            if [ -n "$2" ] && [ "$_in_boot" = 1 ]; then
                case "$_l" in
                    \[boot\]*) echo "$_l"; echo "tries = $2"; _done=1; continue ;;
                    tries* | " "*tries* | "	"*tries*)
                        _k=$(echo "$_l" | sed 's/[[:space:]]*=.*//; s/^[[:space:]]*//')
                        [ "$_k" = tries ] && continue
                        ;;
                esac
            fi
            echo "$_l"
        done < "$1" > "$3"
    fi
    if [ -n "$2" ] && [ "$_done" = 0 ]; then
        printf '\n[boot]\ntries = %s\n' "$2" >> "$3"
    fi
}

treeswap_root() {
    _new=$1
    # Only a command line that names a state root boots from one: with the hook installed
    # (say, by a package), a machine booted without these keeps its usual root.
    if [ -z "$(ts_arg treeswap.root "")$(ts_arg treeswap.path "")" ]; then
        return 0
    fi
    if [ "$(ts_arg treeswap on)" = off ]; then
        ts_say "treeswap=off: booting the root as mounted"
        return 0
    fi
    _bin=$(command -v treeswap) || { ts_say "error: no treeswap binary in the initramfs"; return 1; }
    _path=$(ts_arg treeswap.path /versions)
    _tries=$(ts_arg treeswap.tries "")
    _persist=$(ts_arg treeswap.persist var,home)
    _pdir=$(ts_arg treeswap.persistdir /persist)
    _dev=$(ts_arg treeswap.root "")
    case "$_tries" in '' | *[!0-9]*) [ -z "$_tries" ] || { ts_say "error: treeswap.tries=$_tries is not a number; ignored"; _tries=; } ;; esac

    mkdir -p "$TS_DEV"
    if [ -n "$_dev" ]; then
        _arg=$_dev
        _dev=$(ts_resolve "$_dev")
        [ -b "$_dev" ] || { ts_say "error: treeswap.root=$_arg: no such block device"; return 1; }
    fi
    _mounted=
    while read -r _d _m _rest; do
        [ "$_m" = "$_new" ] && _mounted=$_d
    done < /proc/mounts
    if [ -z "$_dev" ] || [ "$_dev" = "$_mounted" ]; then
        mount -n -o move "$_new" "$TS_DEV" || { ts_say "error: cannot move $_new to $TS_DEV"; return 1; }
        mount -n -o remount,rw "$TS_DEV" || { ts_say "error: cannot remount the root device read-write"; return 1; }
    else
        mount -n -o rw "$_dev" "$TS_DEV" || { ts_say "error: cannot mount $_dev"; return 1; }
        umount -n "$_new" 2>/dev/null || true
    fi
    _root=$TS_DEV/${_path#/}
    [ -d "$_root" ] || { ts_say "error: no state root at ${_path} on the root device"; return 1; }

    _cfg=$(ts_arg treeswap.config "")
    if [ -n "$_cfg" ]; then
        _cfg=$TS_DEV/${_cfg#/}
        [ -f "$_cfg" ] || { ts_say "error: treeswap.config: no file $_cfg"; return 1; }
    elif [ -f "$_root.toml" ]; then
        _cfg=$_root.toml
    fi
    ts_config "$_cfg" "$_tries" "$TS_RUN/treeswap.toml"
    export TREESWAP_ROOT="$_root" TREESWAP_CONFIG="$TS_RUN/treeswap.toml"

    # Guests are not running yet, so a flip here restarts none.
    # (|| keeps a caller's set -e from stopping here: exit 5 is a boot, on the old tree.)
    _rc=0
    "$_bin" boot || _rc=$?
    case $_rc in
        0) ;;
        5) ts_say "the pending tree used up its boot tries; booting the previous tree" ;;
        *) ts_say "warning: \`treeswap boot' failed (exit $_rc); booting the current tree as it is" ;;
    esac
    _cur=$(readlink "$_root/current") || { ts_say "error: the state root has no current tree"; return 1; }
    _ver=${_cur#trees/}
    [ -d "$_root/$_cur" ] || { ts_say "error: current names $_cur, which is missing"; return 1; }

    mount -n --bind "$_root/$_cur" "$_new" || { ts_say "error: cannot bind $_cur on $_new"; return 1; }
    mount -n -o remount,bind,ro "$_new" || ts_say "warning: cannot make the tree read-only"
    for _p in $(echo "$_persist" | tr ',' ' '); do
        [ "$_p" = none ] && continue
        _p=${_p#/}
        case "/$_p/" in */../* | */./* | //) ts_say "error: treeswap.persist: bad path $_p"; continue ;; esac
        _src=$TS_DEV/${_pdir#/}/$_p
        if [ ! -d "$_src" ]; then
            # First boot with this path persistent: start from the tree's copy.
            mkdir -p "$_src" || { ts_say "error: cannot make $_src"; continue; }
            if [ -d "$_new/$_p" ]; then
                cp -a "$_new/$_p/." "$_src/" || ts_say "warning: copying the tree's /$_p to $_src failed"
            fi
        fi
        [ -d "$_new/$_p" ] || { ts_say "warning: the tree has no /$_p; not made persistent"; continue; }
        mount -n --bind "$_src" "$_new/$_p" || ts_say "error: cannot bind $_src on /$_p"
    done
    mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$_new/tmp" 2>/dev/null || true
    {
        echo "TREESWAP_ROOT=$_root"
        echo "TREESWAP_CONFIG=$TS_RUN/treeswap.toml"
        echo "TREESWAP_VERSION=$_ver"
    } > "$TS_RUN/env"
    ts_say "booting tree $_ver from $_path"
    return 0
}
