#!/usr/bin/env bash
# test-root-script.sh - the initramfs boot logic (scripts/initramfs-tools/treeswap-root.sh)
# without a VM, in seconds: in a private mount namespace (so nothing leaks to the host), a
# loop-mounted ext4 image with a state root stands in for the root device, a tmpfs for the
# initramfs's /run, and a file bind-mounted on /proc/cmdline for the kernel command line.
# Checks: the current tree is bound read-only on the new root, the persistent paths are the
# device's (seeded from the tree on first boot), treeswap.tries= overrides the config's
# [boot] tries, a pending tree that used up its tries is reverted, and /run/treeswap/env names
# what booted. Run by tests/boot_script.rs (root only) and by scripts/vm-test.sh first.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
LOOPDEV=
cleanup() {
    [ -z "$LOOPDEV" ] || losetup -d "$LOOPDEV" || true
    ts_cleanup
}
trap cleanup EXIT
build_treeswap
ts_mktemp
W=$TS_TMP
lib="$TS_SCRIPTS/initramfs-tools/treeswap-root.sh"
for f in "$lib" "$TS_SCRIPTS/initramfs-tools/scripts/local-bottom/treeswap" \
         "$TS_SCRIPTS/initramfs-tools/hooks/treeswap" "$TS_SCRIPTS/dracut/90treeswap/treeswap-mount.sh"; do
    sh -n "$f" || die "$f: syntax error"
done
bash -n "$TS_SCRIPTS/dracut/90treeswap/module-setup.sh" || die "module-setup.sh: syntax error"

mk_tree() {
    mkdir -p "$1"/{etc,var/lib/app,home,tmp,usr/bin}
    echo "tree $2" > "$1/etc/os-release"
    echo "seed $2" > "$1/var/lib/app/seed"
}
mk_tree "$W/t1" 1
mk_tree "$W/t2" 2
truncate -s 256M "$W/disk.img"
mkfs.ext4 -q -F -L tsroot "$W/disk.img"
mkdir -p "$W/dev" "$W/new" "$W/bin"
ln -s "$TREESWAP" "$W/bin/treeswap"
# A loop device of our own (losetup -f: others use loop devices too) that stays attached
# across the mounts, as a disk would.
LOOPDEV=$(losetup -f --show "$W/disk.img")
loopdev=$LOOPDEV
mount "$loopdev" "$W/dev"
"$TREESWAP" --root "$W/dev/versions" init > /dev/null
printf '# the site config\n[boot]\n  tries = 5 # five\n[health]\ncommand = ["/bin/false"]\n' > "$W/dev/versions.toml"
"$TREESWAP" --root "$W/dev/versions" --config "$W/dev/versions.toml" import "$W/t1" --version 1 --activate > /dev/null
"$TREESWAP" --root "$W/dev/versions" --config "$W/dev/versions.toml" import "$W/t2" --version 2 > /dev/null
"$TREESWAP" --root "$W/dev/versions" --config "$W/dev/versions.toml" switch 2 > /dev/null
umount "$W/dev"

# boot CMDLINE: one "boot" in a private mount namespace; prints what the new root holds.
boot() {
    echo "$1" > "$W/cmdline"
    # The image is mounted on the new root as the initramfs would (read-only, as root=... ro).
    unshare -m --propagation private env PATH="$W/bin:$PATH" TS_KMSG=/dev/null W="$W" LIB="$lib" LOOP="$loopdev" bash -c '
        set -e
        mount --bind "$W/cmdline" /proc/cmdline
        mount -t tmpfs tmpfs /run
        mount -o ro "$LOOP" "$W/new"
        . "$LIB"
        treeswap_root "$W/new"
        echo "top: $(ls "$W/new" | tr "\n" " " | sed "s/ $//")"
        echo "os: $(cat "$W/new/etc/os-release")"
        echo "seed: $(cat "$W/new/var/lib/app/seed")"
        if touch "$W/new/etc/x" 2>/dev/null; then echo "root: rw"; else echo "root: ro"; fi
        echo "boot $(date +%s%N)" >> "$W/new/var/lib/app/log" && echo "var: rw"
        sed "s/^/env: /" /run/treeswap/env
        grep -c "^ *tries" /run/treeswap/treeswap.toml | sed "s/^/tries lines: /"
        sed -n "s/^tries = /tries: /p" /run/treeswap/treeswap.toml
    ' 2>&1 || true
}
check() { grep -q -x -- "$2" <<<"$1" || { echo "$1" >&2; die "$3: no line \`$2'"; }; log "ok: $3"; }

out=$(boot "root=$loopdev ro")
check "$out" "top: lost+found versions versions.toml" \
    "without treeswap.root= or treeswap.path= the root stays as the initramfs mounted it"
out=$(boot "root=$loopdev ro treeswap.root=LABEL=nosuchlabel treeswap.path=/versions")
check "$out" "treeswap: error: treeswap.root=LABEL=nosuchlabel: no such block device" "an unknown label is one clear error"
out=$(boot "root=$loopdev ro treeswap.path=/versions treeswap.tries=1")
check "$out" "os: tree 2" "the pending tree 2 is booted (boot 1 of 1)"
check "$out" "top: etc home tmp usr var" "the new root is the tree"
check "$out" "env: TREESWAP_VERSION=2" "/run/treeswap/env names version 2"
check "$out" "root: ro" "the tree is read-only"
check "$out" "var: rw" "/var is writable"
check "$out" "seed: seed 2" "a new persistent /var starts from the tree's copy"
check "$out" "tries lines: 1" "treeswap.tries= replaces the config's tries"
check "$out" "tries: 1" "the config says tries = 1"
out=$(boot "root=$loopdev ro treeswap.path=/versions treeswap.tries=1")
check "$out" "treeswap: the pending tree used up its boot tries; booting the previous tree" \
    "a pending tree past its tries is reverted, and the console says so"
check "$out" "os: tree 1" "version 1 is booted after the revert"
check "$out" "seed: seed 2" "/var persists across trees (the device's, not the tree's)"
mount -o ro "$loopdev" "$W/dev"
[ "$(wc -l < "$W/dev/persist/var/lib/app/log")" = 2 ] || die "the persistent /var lost a write"
log "ok: the persistent /var on the device kept both boots' writes"
[ "$(readlink "$W/dev/versions/current")" = trees/1 ] || die "current is not trees/1"
for v in 1 2; do "$TREESWAP" --root "$W/dev/versions" verify "$v" > /dev/null; done
log "ok: both trees still verify after being booted"
umount "$W/dev"
log "test-root-script: all checks passed"
