#!/bin/bash
# bench-apply.sh - time applying a real Debian point-release update: treeswap apply
# against cp -al and against OSTree's static delta.
#
# Usage: bench-apply.sh [REPS]        (as root; any cwd; REPS defaults to 3)
#
# The update: the cached debootstrap --variant=minbase bookworm tree and its copy after a
# real `apt-get upgrade` (lib.sh). OSTree refuses device nodes, so ALL THREE tools get
# copies of both trees with device nodes, FIFOs and sockets removed (the count is
# printed); the treeswap delta and the OSTree delta are made from those copies.
# Timed steps, each in a fresh root / repo / destination:
#   (a) treeswap apply DELTA --no-restart into a root holding only the base (version 1):
#       check, write objects, stage, verify, flip
#       in treeswap's default protection mode (`protect = auto`: immutable objects where
#       the file system cannot reflink; printed), and for reference with
#       TREESWAP_PROTECT=hardlink (no protection) in a second root
#   (b) cp -al of the new tree (the plain copy of the upgraded tree: trees/2 cannot be the
#       source when its objects are immutable, as the kernel refuses links to them)
#   (c) OSTree: `static-delta apply-offline FILE` into a bare repo holding only the base
#       commit (pull-local), then `checkout -H NEW dest`, timed together. The delta is
#       `static-delta generate --inline --min-fallback-size=0 --from=BASE --to=NEW
#       --filename=FILE` in a bare repo holding both commits (untimed).
# Method: COLD cache: before every timed step `sync; echo 3 > drop_caches`; a timed step
# is the command(s) then `sync` (so writeback left to the kernel counts like fsyncs a tool
# does itself). REPS rounds, treeswap and OSTree alternating which goes first; the median
# wall time is reported (CPU time, user+sys of the step, too, as the machine may be
# shared: see the load averages). Each result is compared with the new tree at the end.
# Goals: treeswap apply / cp -al <= 1.5; treeswap apply / ostree < 1.0. Prints PASS/FAIL
# per goal and exits 0 either way (a benchmark); non-zero only if a command fails or a
# result is wrong.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

REPS=${1:-3}
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [REPS]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (drop_caches, root-owned trees)"
ensure_pkgs ostree
base_src=$(bookworm_tree)
new_src=$(bookworm_upgraded_tree)
build_treeswap
ts_mktemp
W=$TS_TMP

log "copying both trees without device nodes, fifos and sockets"
n_base=$(ts_copy_without_specials "$base_src" "$W/base")
n_new=$(ts_copy_without_specials "$new_src" "$W/new")

log "treeswap diff (untimed)"
"$TREESWAP" -v diff --from-dir "$W/base" --to-dir "$W/new" --from-version 1 --to-version 2 \
    -o "$W/delta.tar" 2> "$W/diff.log" || { cat "$W/diff.log" >&2; die "treeswap diff failed"; }
log "ostree commits and static-delta generate (untimed)"
ostree --repo="$W/osrc" init --mode=bare
ostree --repo="$W/osrc" commit --branch=base --tree=dir="$W/base" > /dev/null
ostree --repo="$W/osrc" commit --branch=new --tree=dir="$W/new" > /dev/null
BASEC=$(ostree --repo="$W/osrc" rev-parse base)
NEWC=$(ostree --repo="$W/osrc" rev-parse new)
ostree --repo="$W/osrc" static-delta generate --inline --min-fallback-size=0 \
    --from="$BASEC" --to="$NEWC" --filename="$W/ostree.delta" > "$W/gen.log" 2>&1 \
    || { tail "$W/gen.log" >&2; die "ostree static-delta generate failed"; }

ostree_apply() {
    ostree --repo="$W/odst" static-delta apply-offline "$W/ostree.delta"
    ostree --repo="$W/odst" checkout -H "$NEWC" "$W/co-ostree"
}

declare -A wall cpu
# timed KEY CMD...: drop caches, run CMD then sync; append wall and CPU seconds.
timed() {
    local key=$1 t
    shift
    drop_caches
    local TIMEFORMAT='%R %U %S'
    { time { "$@" > "$W/last.out" 2>&1 && sync; }; } 2> "$W/time.out" \
        || { cat "$W/last.out" >&2; die "failed: $*"; }
    t=$(tail -1 "$W/time.out")
    wall[$key]+="$(awk '{ printf "%.2f", $1 }' <<<"$t") "
    cpu[$key]+="$(awk '{ printf "%.2f", $2 + $3 }' <<<"$t") "
}

load_before=$(ts_loadavg)
for ((i = 1; i <= REPS; i++)); do
    log "round $i/$REPS"
    for d in ts tsh odst co-cp co-ostree; do _ts_rm_tree "$W/$d"; done
    "$TREESWAP" -q --root "$W/ts" import "$W/base" --version 1 --activate
    TREESWAP_PROTECT=hardlink "$TREESWAP" -q --root "$W/tsh" import "$W/base" --version 1 --activate
    ostree --repo="$W/odst" init --mode=bare
    ostree --repo="$W/odst" pull-local "$W/osrc" "$BASEC" > /dev/null
    if ((i % 2)); then
        timed ts_apply "$TREESWAP" -q --root "$W/ts" apply "$W/delta.tar" --no-restart
        timed ostree ostree_apply
    else
        timed ostree ostree_apply
        timed ts_apply "$TREESWAP" -q --root "$W/ts" apply "$W/delta.tar" --no-restart
    fi
    timed ts_apply_hl env TREESWAP_PROTECT=hardlink \
        "$TREESWAP" -q --root "$W/tsh" apply "$W/delta.tar" --no-restart
    timed cp_al cp -al "$W/new" "$W/co-cp"
done
protect=$("$TREESWAP" --root "$W/ts" status | sed -n 's/^protect: *//p')
protect_hl=$(TREESWAP_PROTECT=hardlink "$TREESWAP" --root "$W/tsh" status | sed -n 's/^protect: *//p')
load_after=$(ts_loadavg)

# A benchmark of a wrong result is worthless: check all three against the new tree.
for d in "$W/ts/current/" "$W/tsh/current/" "$W/co-cp" "$W/co-ostree"; do
    "$TS_SCRIPTS/compare-trees.sh" "$W/new" "$d" > "$W/cmp.out" \
        || { head -20 "$W/cmp.out" >&2; die "$d differs from the upgraded tree"; }
done
[ "$(readlink "$W/ts/current")" = trees/2 ] || die "treeswap current is not trees/2"

w_ts=$(ts_median "${wall[ts_apply]}"); c_ts=$(ts_median "${cpu[ts_apply]}")
w_hl=$(ts_median "${wall[ts_apply_hl]}"); c_hl=$(ts_median "${cpu[ts_apply_hl]}")
w_cp=$(ts_median "${wall[cp_al]}"); c_cp=$(ts_median "${cpu[cp_al]}")
w_os=$(ts_median "${wall[ostree]}"); c_os=$(ts_median "${cpu[ostree]}")
r_cp=$(ts_ratio "$w_ts" "$w_cp")
r_os=$(ts_ratio "$w_ts" "$w_os")

echo
echo "update: $base_src -> $new_src"
echo "  both copied without device nodes/fifos/sockets ($n_base removed from the base," \
    "$n_new from the new tree): $(find "$W/new" | wc -l) entries," \
    "$(du -s --apparent-size -B1M "$W/new" | cut -f1) MiB"
echo "  treeswap delta: $(stat -c %s "$W/delta.tar") bytes;" \
    "ostree delta: $(stat -c %s "$W/ostree.delta") bytes"
sed 's/^treeswap: info: /  treeswap /' "$W/diff.log"
echo "method: cold cache (drop_caches before each step), command + sync," \
    "median of $REPS; all three results checked entry by entry against the new tree"
echo "load average before: $load_before, after: $load_after ($(nproc) CPUs)"
echo "treeswap: $("$TREESWAP" --version 2>/dev/null || echo "$TREESWAP");" \
    "ostree: $(ostree --version | sed -n "s/^ *Version: *//p" | tr -d "'")"
printf '%-44s %7s %7s   %s\n' step "wall s" "cpu s" "wall samples (s)"
printf '%-44s %7s %7s   %s\n' "(a) treeswap apply, protect: ${protect:-?}" "$w_ts" "$c_ts" "${wall[ts_apply]}"
printf '%-44s %7s %7s   %s\n' "    treeswap apply, protect: ${protect_hl:-?} (ref.)" "$w_hl" "$c_hl" "${wall[ts_apply_hl]}"
printf '%-44s %7s %7s   %s\n' "(b) cp -al of the new tree" "$w_cp" "$c_cp" "${wall[cp_al]}"
printf '%-44s %7s %7s   %s\n' "(c) ostree apply-offline + checkout -H" "$w_os" "$c_os" "${wall[ostree]}"
echo
printf 'goal treeswap apply / cp -al   <= 1.5: %6sx  %s   (cpu: %sx)\n' \
    "$r_cp" "$(ts_verdict "$r_cp" 1.5)" "$(ts_ratio "$c_ts" "$c_cp")"
printf 'goal treeswap apply / ostree   <  1.0: %6sx  %s   (cpu: %sx)\n' \
    "$r_os" "$(ts_verdict "$r_os" 1.0 lt)" "$(ts_ratio "$c_ts" "$c_os")"
echo "  (with protect: ${protect_hl:-?}: $(ts_ratio "$w_hl" "$w_cp")x cp -al," \
    "$(ts_ratio "$w_hl" "$w_os")x ostree; the goals are judged on the default mode)"
