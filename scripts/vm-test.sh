#!/usr/bin/env bash
# vm-test.sh - the machine itself boots from a treeswap tree, in a real virtual machine.
#
# Usage: scripts/vm-test.sh [--full] [--dracut]
#
# Builds a disk image whose ext4 file system holds a state root (/versions) with real Debian
# trees (debootstrap bookworm minbase as version 1; the same after a real `apt-get upgrade`
# as version 2), an initramfs made by the stock mkinitramfs with treeswap's initramfs-tools
# hook and local-bottom script (scripts/initramfs-tools/), and boots it in QEMU with a Debian
# kernel (apt-get download + dpkg -x; QEMU the same way: nothing is installed on the host),
# reading the serial console. Each boot is one QEMU run; the guest's init
# (scripts/vm/guest-init) runs `treeswap mark-good --check`, `treeswap status`, then the
# step's commands from a second virtual disk, then powers off.
#
# Short form (the default; run by .ci/run), three boots:
#   1. boots into version 1; `treeswap status` in the VM says so;
#   2. `treeswap apply` of the delta 1 -> 2 from the second virtual disk (`treeswap update`
#      is being built separately; an apply of a delta on a second disk is what the issue
#      allows), then a reboot: version 2 runs.
# --full adds:
#   3. version 2's health check fails (its /usr/local/sbin/vm-health exits 1 on purpose):
#      after treeswap.tries=2 more boots, the initramfs's `treeswap boot` flips back and the
#      machine boots version 1, saying so on the console;
#   4. `treeswap --revert` and a reboot: version 2 runs again;
#   5. power cuts: the apply 1 -> 2 inside the VM is recorded with dm-log-writes (on a copy
#      of the state disk before it), the log is replayed on the host to every flush point
#      (scripts/vm/replay-log.py), and each replayed image is booted: it must boot version 1
#      or 2, and on the host every installed tree passes `treeswap verify --full` (so no
#      object an installed manifest names is missing or wrong).
#
# --dracut: the initramfs is made by dracut (in a chroot of its own) with the 90treeswap
# module (scripts/dracut/) instead of initramfs-tools.
# Accelerator: TCG. /dev/kvm on these machines is a software hypervisor that cannot run a
# stock kernel; set VM_ACCEL=kvm where KVM really works.
# Environment: TREESWAP_CACHE (see lib.sh), TREESWAP (a binary to use), VM_MEM (MiB, default
# 1024), VM_ACCEL (default tcg), VM_TIMEOUT (seconds per boot, default 900), VM_WORKDIR
# (images and logs, removed at exit; default $TREESWAP_CACHE/vm-work).
# First run on an empty cache: about 2 minutes of downloads (QEMU 17 MB, the kernel 71 MB,
# initramfs-tools in a chroot) plus debootstrap and the upgrade of lib.sh's cached trees.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$TS_SCRIPTS/vm/fetch.sh"

full=0 initramfs=initramfs-tools
for a in "$@"; do
    case "$a" in
        --full) full=1 ;;
        --dracut) initramfs=dracut ;;
        -h | --help) sed -n '2,44p' "$0"; exit 0 ;;
        *) die "unknown argument \`$a' (see --help)" ;;
    esac
done
VM_MEM=${VM_MEM:-1024}
VM_ACCEL=${VM_ACCEL:-tcg}
VM_TIMEOUT=${VM_TIMEOUT:-900}

QEMU_PID=
MOUNTS=()
vm_cleanup() {
    local i
    if [ -n "$QEMU_PID" ]; then kill "$QEMU_PID" 2>/dev/null || true; wait "$QEMU_PID" 2>/dev/null || true; fi
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" || true
    done
    ts_cleanup
}
trap vm_cleanup EXIT

ensure_pkgs e2fsprogs python3 xz-utils zstd
build_treeswap
# The boot logic without a VM first (seconds): a failure there is easier to read.
"$TS_SCRIPTS/vm/test-root-script.sh"
vm_qemu
vm_kernel
if [ "$initramfs" = dracut ]; then vm_dracut_builder; else vm_builder; fi
# Not in /tmp: the images and console logs must outlive any sweep of /tmp by other work on
# the machine (a run once lost its console log that way, mid-test).
export TMPDIR=${VM_WORKDIR:-$TS_CACHE/vm-work}
mkdir -p "$TMPDIR"
ts_mktemp
W=$TS_TMP
t_start=$(ts_now)

# --- the initramfs: the stock mkinitramfs of the builder chroot, with treeswap's hook -----
make_initrd() (
    set -euo pipefail
    local b=$BUILDER
    trap 'umount "$b/proc" 2>/dev/null || true' EXIT
    install -D -m 755 "$TS_SCRIPTS/initramfs-tools/hooks/treeswap" "$b/etc/initramfs-tools/hooks/treeswap"
    install -D -m 755 "$TS_SCRIPTS/initramfs-tools/scripts/local-bottom/treeswap" \
        "$b/etc/initramfs-tools/scripts/local-bottom/treeswap"
    install -D -m 644 "$TS_SCRIPTS/initramfs-tools/treeswap-root.sh" "$b/usr/share/treeswap/treeswap-root.sh"
    install -D -m 755 "$TREESWAP" "$b/usr/sbin/treeswap"
    # Only what this machine needs (MODULES=list): fewer modules load faster under TCG.
    # dm-log-writes is for the power-cut recording of --full.
    printf '%s\n' virtio_pci virtio_blk ext4 dm_mod dm_log_writes > "$b/etc/initramfs-tools/modules"
    sed -i 's/^MODULES=.*/MODULES=list/' "$b/etc/initramfs-tools/initramfs.conf"
    mount -t proc proc "$b/proc"
    chroot "$b" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
        mkinitramfs -o /tmp/treeswap-vm.initrd "$KVER" >&2
    # The hook must have put treeswap and its boot script in.
    chroot "$b" lsinitramfs /tmp/treeswap-vm.initrd > "$W/initrd.list"
    grep -q '^usr/sbin/treeswap$' "$W/initrd.list" && grep -q 'scripts/local-bottom/treeswap$' "$W/initrd.list" \
        || die "the initramfs lacks treeswap or its local-bottom script"
    mv "$b/tmp/treeswap-vm.initrd" "$W/initrd.img"
)
# The same with dracut and the 90treeswap module.
make_initrd_dracut() (
    set -euo pipefail
    local b=$BUILDER
    trap 'umount "$b/dev" "$b/proc" 2>/dev/null || true' EXIT
    rm -rf "$b/usr/lib/dracut/modules.d/90treeswap"
    mkdir -p "$b/usr/lib/dracut/modules.d/90treeswap"
    cp -L "$TS_SCRIPTS"/dracut/90treeswap/* "$b/usr/lib/dracut/modules.d/90treeswap/"
    install -D -m 755 "$TREESWAP" "$b/usr/sbin/treeswap"
    mount -t proc proc "$b/proc"
    mount --bind /dev "$b/dev"
    # Only what this machine needs, as with MODULES=list above.
    chroot "$b" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
        dracut --force --quiet --no-hostonly --no-hostonly-cmdline --no-early-microcode \
        --kver "$KVER" -m "base rootfs-block udev-rules kernel-modules treeswap" \
        --drivers "virtio_pci virtio_blk ext4 dm_mod dm_log_writes" --compress zstd \
        /tmp/treeswap-vm.initrd >&2
    chroot "$b" lsinitrd /tmp/treeswap-vm.initrd > "$W/initrd.list"
    grep -q ' usr/sbin/treeswap$' "$W/initrd.list" && grep -q 'mount/50-treeswap-mount.sh$' "$W/initrd.list" \
        || die "the initramfs lacks treeswap or its mount hook"
    mv "$b/tmp/treeswap-vm.initrd" "$W/initrd.img"
)
if [ "$initramfs" = dracut ]; then
    log "dracut $KVER with the 90treeswap module"
    _ts_locked make_initrd_dracut
else
    log "mkinitramfs $KVER with treeswap's hook"
    _ts_locked make_initrd
fi

# --- the trees -------------------------------------------------------------------------
# add_test_files DIR HEALTH: the test's init, treeswap and a health check that exits HEALTH.
add_test_files() {
    install -D -m 755 "$TREESWAP" "$1/usr/sbin/treeswap"
    install -D -m 755 "$TS_SCRIPTS/vm/guest-init" "$1/sbin/vm-init"
    mkdir -p "$1/usr/local/sbin"
    if [ "$2" = 0 ]; then
        printf '#!/bin/sh\necho "vm-health: ok"\nexit 0\n' > "$1/usr/local/sbin/vm-health"
    else
        printf '#!/bin/sh\necho "vm-health: this tree'\''s check fails on purpose"\nexit %s\n' "$2" \
            > "$1/usr/local/sbin/vm-health"
    fi
    chmod 755 "$1/usr/local/sbin/vm-health"
    echo treeswap-vm > "$1/etc/hostname"
}
log "the trees: bookworm minbase (1) and the same after apt-get upgrade (2)"
cp -a "$(bookworm_tree)" "$W/v1"
cp -a "$(bookworm_upgraded_tree)" "$W/v2"
add_test_files "$W/v1" 0
add_test_files "$W/v2" 1
"$TREESWAP" diff --from-dir "$W/v1" --from-version 1 --to-dir "$W/v2" --to-version 2 \
    -o "$W/delta-1-2.tar" >&2
log "delta 1 -> 2: $(du -h "$W/delta-1-2.tar" | cut -f1)"

# --- the disk ----------------------------------------------------------------------------
# The state disk: ext4 with the state root at /versions holding version 1 (current), its
# config next to it (/versions.toml, found by the initramfs script) and /persist.
make_disk() {
    local img=$1 m="$W/mnt"
    truncate -s 4G "$img"
    mkfs.ext4 -q -F -L tsroot "$img"
    mkdir -p "$m"
    mount -o loop "$img" "$m"; MOUNTS+=("$m")
    "$TREESWAP" --root "$m/versions" init >&2
    cat > "$m/versions.toml" <<'EOF'
[health]
command = ["/usr/local/sbin/vm-health"]
timeout = 60
EOF
    "$TREESWAP" --root "$m/versions" --config "$m/versions.toml" import "$W/v1" --version 1 --activate >&2
    umount "$m"; unset 'MOUNTS[-1]'
}
log "the state disk"
make_disk "$W/disk.img"

# job_disk NAME FILE...: the second virtual disk, an ext4 image holding run.sh (from stdin)
# and FILE....
job_disk() {
    local name=$1 d="$W/job.$1"; shift
    rm -rf "$d"; mkdir -p "$d"
    cat > "$d/run.sh"
    [ $# -eq 0 ] || cp -a "$@" "$d/"
    local mb=$(( $(du -sm "$d" | cut -f1) + 32 ))
    rm -f "$W/job.img"
    mkfs.ext4 -q -F -L tsjob -d "$d" "$W/job.img" "${mb}M"
}

BOOTS=0
# The state device on the kernel command line: by label, as a machine would name it (the
# power-cut recording has a second disk of the same label, so it names /dev/vda).
BOOT_ROOT=LABEL=tsroot
# boot NAME [DISK [EXTRA-DRIVE...]]: one boot of the VM, until the guest powers off; the
# console is in $W/NAME.log (printed with a prefix) and $LOG.
boot() {
    local name=$1 disk=${2:-$W/disk.img}; shift 2 || shift $#
    local drives=(-drive "file=$disk,format=raw,if=virtio,cache=none,aio=threads"
                  -drive "file=$W/job.img,format=raw,if=virtio,readonly=on")
    local d
    for d in "$@"; do drives+=(-drive "file=$d,format=raw,if=virtio,cache=none"); done
    LOG="$W/$name.log"
    local t0 t1
    t0=$(ts_now)
    "$QEMU" -accel "$VM_ACCEL" -m "$VM_MEM" -smp 1 -nodefaults -no-user-config -display none \
        -no-reboot -serial "file:$LOG" -kernel "$KDIR/vmlinux" -initrd "$W/initrd.img" \
        -append "console=ttyS0 quiet root=/dev/vda ro init=/sbin/vm-init panic=-1 rd.shell=0 rd.emergency=reboot treeswap.root=$BOOT_ROOT treeswap.path=/versions treeswap.tries=2" \
        "${drives[@]}" &
    QEMU_PID=$!
    local waited=0
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        sleep 1
        waited=$((waited + 1))
        if [ "$waited" -ge "$VM_TIMEOUT" ]; then
            kill "$QEMU_PID"; wait "$QEMU_PID" || true; QEMU_PID=
            sed 's/^/  | /' "$LOG" >&2
            die "boot $name: no power-off after ${VM_TIMEOUT}s"
        fi
    done
    wait "$QEMU_PID" || die "boot $name: QEMU failed"
    QEMU_PID=
    t1=$(ts_now)
    BOOTS=$((BOOTS + 1))
    log "boot $name: $(ts_elapsed "$t0" "$t1") s"
    [ -f "$LOG" ] || die "boot $name: the console log $LOG is gone"
    tr -d '\r' < "$LOG" > "$LOG.txt"
    LOG=$LOG.txt
    grep -a -E '^(treeswap|vm-init|status|vm-health|step):' "$LOG" | sed 's/^/  | /' >&2 || true
}
# expect PATTERN WHAT: the last boot's console has a line matching PATTERN.
expect() {
    grep -a -q -E "$1" "$LOG" || { sed 's/^/  | /' "$LOG" | tail -60 >&2; die "$2: no line matching /$1/ in $LOG"; }
    log "ok: $2"
}
running() { expect "^vm-init: running tree $1 " "$2"; }

# --- 1. boot into version 1 --------------------------------------------------------------
job_disk boot1 "$W/delta-1-2.tar" <<'EOF'
# apply the delta 1 -> 2 from this disk
treeswap apply --insecure /run/job/delta-1-2.tar 2>&1 | sed 's/^/step: /'
EOF
boot 1-v1
running 1 "1. the machine boots into version 1"
expect '^status: current: +1$' "1. treeswap status in the VM names version 1 current"
expect '^step: .*2' "2. treeswap apply of the delta from the second disk"

# --- 2. reboot into version 2 ------------------------------------------------------------
job_disk boot2 <<'EOF'
# nothing: look at the status
true
EOF
boot 2-v2
running 2 "2. after the apply and a reboot, version 2 runs"
expect '^status: current: +2$' "2. treeswap status in the VM names version 2 current"

if [ "$full" = 0 ]; then
    log "short form passed: $BOOTS boots in $(ts_elapsed "$t_start" "$(ts_now)") s"
    exit 0
fi

# --- 3. version 2's health check fails: after the tries it boots version 1 by itself --------
job_disk idle <<'EOF'
# nothing: look at the status
true
EOF
boot 3-v2-again
running 2 "3. version 2 is still pending and runs its second boot (treeswap.tries=2)"
expect '^status: boot: +`2` pending, 0 boot' "3. no boot try left for version 2"
job_disk revert <<'EOF'
# treeswap --revert (when version 1 runs)
if [ "$TREESWAP_VERSION" = 1 ]; then treeswap --revert 2>&1 | sed 's/^/step: /'; fi
EOF
boot 3-v1-reverted
expect '^treeswap: the pending tree used up its boot tries; booting the previous tree$' \
    "3. the initramfs says on the console that it flips back"
running 1 "3. after the tries the machine boots version 1 by itself"
expect '^status: current: +1$' "3. treeswap status names version 1 current"
expect '^step: reverted' "4. treeswap --revert in the VM"

# --- 4. --revert and a reboot: the other tree --------------------------------------------
job_disk idle <<'EOF'
# nothing: look at the status
true
EOF
boot 4-v2-after-revert
running 2 "4. after --revert and a reboot, version 2 runs"

# --- 5. power cuts: the apply recorded with dm-log-writes, replayed to every flush point ---
log "5. power cuts: a fresh state disk (version 1), recorded apply of 1 -> 2"
make_disk "$W/cut-base.img"
# The disk the VM boots from for the recording, and the one the apply writes to (through
# dm-log-writes, onto the log disk); the replays start from cut-base.img, as the target did.
cp --sparse=always "$W/cut-base.img" "$W/cut-boot.img"
cp --sparse=always "$W/cut-base.img" "$W/cut-target.img"
truncate -s 2G "$W/cut-log.img"
mkdir -p "$W/dm"
vm_dmsetup "$W/dm"
job_disk record "$W/delta-1-2.tar" "$W/dm" <<'EOF'
# record the apply 1 -> 2 on /dev/vdc with dm-log-writes (log on /dev/vdd)
export LD_LIBRARY_PATH=/run/job/dm/lib
dm=/run/job/dm/dmsetup
$dm --noudevsync create tslog --table "0 $(cat /sys/block/vdc/size) log-writes /dev/vdc /dev/vdd" || exit 1
[ -b /dev/mapper/tslog ] || $dm --noudevsync mknodes tslog
mkdir -p /run/cut
mount /dev/mapper/tslog /run/cut || exit 1
$dm message tslog 0 mark apply-start
treeswap --root /run/cut/versions --config /run/cut/versions.toml apply --insecure \
    /run/job/delta-1-2.tar 2>&1 | sed 's/^/step: /'
$dm message tslog 0 mark apply-end
umount /run/cut
$dm --noudevsync remove tslog && echo "step: recorded"
EOF
BOOT_ROOT=/dev/vda
boot 5-record "$W/cut-boot.img" "$W/cut-target.img" "$W/cut-log.img"
expect '^step: applied `1` -> `2`' "5. the recorded apply ran"
expect '^step: recorded$' "5. the log is complete"
mapfile -t points < <(python3 "$TS_SCRIPTS/vm/replay-log.py" points "$W/cut-log.img")
total=${points[0]}
points=("${points[@]:1}")
log "5. the log holds $total writes, ${#points[@]} flush points (the start, each flush or FUA, the end)"
[ "${#points[@]}" -ge 3 ] || die "5. too few flush points: ${points[*]}"
cp --sparse=always "$W/cut-base.img" "$W/replay.img"
done_to=0 n=0 booted_old=0 booted_new=0 seen_new=0
m="$W/mnt"
job_disk idle <<'EOF'
# nothing: look at the status
true
EOF
for p in "${points[@]}"; do
    python3 "$TS_SCRIPTS/vm/replay-log.py" replay "$W/cut-log.img" "$W/replay.img" "$done_to" "$p"
    done_to=$p
    n=$((n + 1))
    cp --sparse=always "$W/replay.img" "$W/point.img"
    boot "5-point-$n-entry-$p" "$W/point.img"
    if grep -a -q -E '^vm-init: running tree 1 ' "$LOG"; then
        booted_old=$((booted_old + 1))
        [ "$seen_new" = 0 ] || die "5. point $n (entry $p): boots version 1 after an earlier point booted 2"
        v=1
    elif grep -a -q -E '^vm-init: running tree 2 ' "$LOG"; then
        booted_new=$((booted_new + 1)); seen_new=1; v=2
    else
        sed 's/^/  | /' "$LOG" | tail -40 >&2
        die "5. point $n (entry $p): the machine boots neither version 1 nor version 2"
    fi
    # On the host: every installed tree passes verify --full.
    mount -o loop,ro "$W/point.img" "$m"; MOUNTS+=("$m")
    [ "$(readlink "$m/versions/current")" = "trees/$v" ] \
        || die "5. point $n: booted $v but current is $(readlink "$m/versions/current")"
    for t in "$m"/versions/trees/*; do
        tv=$(basename "$t")
        "$TREESWAP" --root "$m/versions" verify --full "$tv" > /dev/null 2> "$W/verify.err" \
            || { cat "$W/verify.err" >&2; die "5. point $n (entry $p): verify --full $tv failed"; }
    done
    log "5. point $n of ${#points[@]} (after $p of $total writes): boots $v; verify --full passes on $(ls "$m/versions/trees" | tr '\n' ' ')"
    umount "$m"; unset 'MOUNTS[-1]'
    rm -f "$W/point.img"
done
[ "$booted_new" -ge 1 ] && [ "$booted_old" -ge 1 ] \
    || die "5. expected the first point to boot 1 and the last to boot 2 (old $booted_old, new $booted_new)"
log "5. power cuts: ${#points[@]} flush points checked: $booted_old boot version 1, $booted_new boot version 2; verify --full passed on every installed tree of each"
log "full form passed: $BOOTS boots in $(ts_elapsed "$t_start" "$(ts_now)") s"
