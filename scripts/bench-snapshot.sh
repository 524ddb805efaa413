#!/bin/bash
# bench-snapshot.sh - staging in time proportional to the change: applying a 1% change to a
# 100 000-entry tree on btrfs, where treeswap stages from the base tree's read-only
# snapshot, against `cp -al` of that tree on the same file system.
#
# Usage: bench-snapshot.sh [REPS] [ENTRIES]   (as root; REPS defaults to 3, ENTRIES to 100000)
#
# Setup (untimed): a sparse 8 GiB btrfs image, loop-mounted; the cached gen-tree.py tree
# (lib.sh) and a copy of it with a 1% change (`gen-tree.py --mutate 1`), and the delta
# between them (`treeswap diff --from-dir`); the base tree copied into the btrfs.
# Timed, each REPS times, in fresh state roots on the btrfs holding only the base (imported
# as version 1 in treeswap's default mode there, reflink):
#   (a) treeswap apply DELTA --no-restart      stages from the snapshot of version 1
#   (b) the same with TREESWAP_SNAPSHOTS=0     the whole tree is staged (reference)
#   (c) cp -al of the base tree on the btrfs
# Method: COLD cache (`sync; echo 3 > drop_caches` before every step); a step is the command
# then `sync`; median wall time. Each result is checked, outside the timing: `treeswap verify
# --full 2` (every file re-hashed) passes and the installed manifest's digest is the digest
# of the changed tree.
# Goal: (a) / (c) <= 0.2. Prints PASS/FAIL and exits 0 either way (a benchmark); non-zero
# only if a command fails or a result is wrong.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

REPS=${1:-3}
N=${2:-100000}
[[ $REPS =~ ^[1-9][0-9]*$ && $N =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [REPS] [ENTRIES]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (loop mounts, drop_caches)"
ensure_pkgs btrfs-progs
build_treeswap
ts_mktemp
W=$TS_TMP
M="$W/mnt"
cleanup() {
    umount "$M" 2> /dev/null || true
    ts_cleanup
}
trap cleanup EXIT

base=$(gen_tree_cached "$N" 1)
log "copying and mutating 1% of the $N-entry tree"
cp -a "$base" "$W/b"
python3 "$TS_SCRIPTS/gen-tree.py" --mutate 1 --seed 2 "$W/b" >&2
"$TREESWAP" -q diff --from-dir "$base" --to-dir "$W/b" --from-version 1 --to-version 2 \
    -o "$W/delta"
want=$("$TREESWAP" manifest "$W/b" | sed -n 's/^digest = "\(.*\)"$/\1/p')

log "making the btrfs"
truncate -s 8G "$W/btrfs.img"
mkfs.btrfs -q "$W/btrfs.img" > /dev/null
mkdir -p "$M"
mount -o loop "$W/btrfs.img" "$M"
cp -a "$base" "$M/src"

declare -A wall
# timed KEY CMD...: drop caches, run CMD then sync; append the wall seconds.
timed() {
    local key=$1 t
    shift
    drop_caches
    local TIMEFORMAT='%R'
    { time { "$@" > "$W/last.out" 2>&1 && sync; }; } 2> "$W/time.out" \
        || { cat "$W/last.out" >&2; die "failed: $*"; }
    t=$(tail -1 "$W/time.out")
    wall[$key]+="$t "
}
# check ROOT: version 2 is current, verifies with every file re-hashed, and is the changed
# tree.
check() {
    "$TREESWAP" -q --root "$1" verify --full 2 > /dev/null || die "$1: verify --full 2 failed"
    [ "$(readlink "$1/current")" = trees/2 ] || die "$1: current is not trees/2"
    grep -qx "digest = \"$want\"" "$1/manifests/2.toml" || die "$1: version 2 is not the changed tree"
}

for ((i = 1; i <= REPS; i++)); do
    log "round $i/$REPS"
    "$TREESWAP" -q --root "$M/s$i" init
    "$TREESWAP" -q --root "$M/f$i" init
    "$TREESWAP" -q --root "$M/s$i" import "$base" --version 1 --activate
    "$TREESWAP" -q --root "$M/f$i" import "$base" --version 1 --activate
    timed snap "$TREESWAP" -v --root "$M/s$i" apply "$W/delta" --no-restart
    cp "$W/last.out" "$W/snap.log"
    timed full env TREESWAP_SNAPSHOTS=0 "$TREESWAP" --root "$M/f$i" apply "$W/delta" --no-restart
    timed cp_al cp -al "$M/src" "$M/cp$i"
    check "$M/s$i"
    check "$M/f$i"
done
grep -q "from the snapshot of" "$W/snap.log" || die "the apply did not stage from the snapshot"
mode=$("$TREESWAP" --root "$M/s1" status | sed -n 's/^protect: *//p')

w_snap=$(ts_median "${wall[snap]}")
w_full=$(ts_median "${wall[full]}")
w_cp=$(ts_median "${wall[cp_al]}")
r=$(ts_ratio "$w_snap" "$w_cp")
echo
echo "tree: $N entries ($(du -s --apparent-size -B1M "$base" | cut -f1) MiB), 1% changed:" \
    "delta $(stat -c %s "$W/delta") bytes; btrfs on a loop device, protect: $mode"
echo "method: cold cache (drop_caches before each step), command + sync, median of $REPS;" \
    "every result verified and its digest checked"
echo "load average: $(ts_loadavg) ($(nproc) CPUs)"
printf '%-48s %7s   %s\n' step "wall s" "samples (s)"
printf '%-48s %7s   %s\n' "(a) treeswap apply, staged from the snapshot" "$w_snap" "${wall[snap]}"
printf '%-48s %7s   %s\n' "(b) treeswap apply, whole tree (reference)" "$w_full" "${wall[full]}"
printf '%-48s %7s   %s\n' "(c) cp -al of the tree" "$w_cp" "${wall[cp_al]}"
echo
printf 'goal treeswap apply (snapshot) / cp -al <= 0.2: %sx  %s   (whole tree: %sx)\n' \
    "$r" "$(ts_verdict "$r" 0.2)" "$(ts_ratio "$w_full" "$w_cp")"
