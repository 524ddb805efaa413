#!/bin/bash
# bench-apply.sh - time applying a real Debian point-release update: treeswap apply
# against rsync --link-dest, cp -al and OSTree's static delta.
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
#       source when its objects are immutable, as the kernel refuses links to them); for
#       reference: it writes none of the update's new bytes
#   (r) rsync -aH --link-dest=BASE NEW/ DEST/: the update done by hand (links for what is
#       unchanged, copies of the rest; -H, as the trees have hardlinks); rsync must find
#       what changed, treeswap knows
#   (c) OSTree: `static-delta apply-offline FILE` into a bare repo holding only the base
#       commit (pull-local), then `checkout -H NEW dest`, timed together. The delta is
#       `static-delta generate --inline --min-fallback-size=0 --from=BASE --to=NEW
#       --filename=FILE` in a bare repo holding both commits (untimed).
# Method: COLD cache: before every timed step `sync; echo 3 > drop_caches`; a timed step
# is the command(s) then `sync` (so writeback left to the kernel counts like fsyncs a tool
# does itself). REPS rounds, treeswap and OSTree alternating which goes first; the median
# wall time is reported (CPU time, user+sys of the step, too, as the machine may be
# shared: see the load averages). Each result is compared with the new tree at the end.
# Goals (issue 17): treeswap apply / rsync <= 0.8; treeswap apply / ostree <= 0.25; apply's
# peak memory <= 100 MB. Prints PASS, MARGINAL (a time whose samples put it on either side
# of its goal, the range at least 10% either side of the median ratio: lib.sh's
# ts_judge_times) or FAIL per goal and exits 0 either way (a benchmark);
# non-zero only if a command fails or a result is wrong.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

REPS=${1:-3}
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [REPS]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (drop_caches, root-owned trees)"
ensure_pkgs ostree rsync time
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
    set -e
    ostree --repo="$W/odst" static-delta apply-offline "$W/ostree.delta"
    ostree --repo="$W/odst" checkout -H "$NEWC" "$W/co-ostree"
}
# `timed` runs its command in a child bash (under GNU time), which needs these.
export -f ostree_apply
export W NEWC

declare -A wall cpu rss
# timed KEY CMD...: drop caches, run CMD then sync (GNU time around both); append wall and
# CPU seconds and the peak resident memory (KB).
timed() {
    local key=$1 t
    shift
    drop_caches
    /usr/bin/time -f '%e %U %S %M' -o "$W/time.out" bash -c '"$@" && sync' bash "$@" \
        > "$W/last.out" 2>&1 || { cat "$W/last.out" >&2; die "failed: $*"; }
    t=$(tail -1 "$W/time.out")
    wall[$key]+="$(awk '{ printf "%.2f", $1 }' <<<"$t") "
    cpu[$key]+="$(awk '{ printf "%.2f", $2 + $3 }' <<<"$t") "
    rss[$key]+="$(awk '{ print $4 }' <<<"$t") "
}

load_before=$(ts_loadavg)
for ((i = 1; i <= REPS; i++)); do
    log "round $i/$REPS"
    for d in ts tsh odst co-cp co-ostree co-rsync; do _ts_rm_tree "$W/$d"; done
    "$TREESWAP" -q --root "$W/ts" init
    "$TREESWAP" -q --root "$W/tsh" init
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
    timed rsync rsync -aH --link-dest="$W/base" "$W/new/" "$W/co-rsync/"
done
protect=$("$TREESWAP" --root "$W/ts" status | sed -n 's/^protect: *//p')
protect_hl=$(TREESWAP_PROTECT=hardlink "$TREESWAP" --root "$W/tsh" status | sed -n 's/^protect: *//p')
load_after=$(ts_loadavg)

# A benchmark of a wrong result is worthless: check all three against the new tree.
for d in "$W/ts/current/" "$W/tsh/current/" "$W/co-cp" "$W/co-ostree" "$W/co-rsync"; do
    "$TS_SCRIPTS/compare-trees.sh" "$W/new" "$d" > "$W/cmp.out" \
        || { head -20 "$W/cmp.out" >&2; die "$d differs from the upgraded tree"; }
done
[ "$(readlink "$W/ts/current")" = trees/2 ] || die "treeswap current is not trees/2"

w_ts=$(ts_median "${wall[ts_apply]}"); c_ts=$(ts_median "${cpu[ts_apply]}")
w_hl=$(ts_median "${wall[ts_apply_hl]}"); c_hl=$(ts_median "${cpu[ts_apply_hl]}")
w_cp=$(ts_median "${wall[cp_al]}"); c_cp=$(ts_median "${cpu[cp_al]}")
w_os=$(ts_median "${wall[ostree]}"); c_os=$(ts_median "${cpu[ostree]}")
w_rs=$(ts_median "${wall[rsync]}"); c_rs=$(ts_median "${cpu[rsync]}")
r_cp=$(ts_ratio "$w_ts" "$w_cp")
r_os=$(ts_ratio "$w_ts" "$w_os")
r_rs=$(ts_ratio "$w_ts" "$w_rs")
m_ts=$(tr ' ' '\n' <<<"${rss[ts_apply]}" | sort -n | tail -1)
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
printf '%-44s %7s %7s %9s   %s\n' step "wall s" "cpu s" "peak KB" "wall samples (s), spread"
row() { printf '%-44s %7s %7s %9s   %s\n' "$1" "$(ts_median "${wall[$2]}")" \
    "$(ts_median "${cpu[$2]}")" "$(tr ' ' '\n' <<<"${rss[$2]}" | sort -n | tail -1)" \
    "${wall[$2]}, $(ts_spread "${wall[$2]}")"; }
row "(a) treeswap apply, protect: ${protect:-?}" ts_apply
row "    treeswap apply, protect: ${protect_hl:-?} (ref.)" ts_apply_hl
row "(r) rsync -aH --link-dest" rsync
row "(b) cp -al of the new tree (ref.)" cp_al
row "(c) ostree apply-offline + checkout -H" ostree
echo
printf 'goal treeswap apply / rsync    <= 0.8:  %6sx  %s   (cpu: %sx)\n' \
    "$r_rs" "$(ts_judge_times "${wall[ts_apply]}" "${wall[rsync]}" 0.8)" "$(ts_ratio "$c_ts" "$c_rs")"
printf 'goal treeswap apply / ostree   <= 0.25: %6sx  %s   (cpu: %sx)\n' \
    "$r_os" "$(ts_judge_times "${wall[ts_apply]}" "${wall[ostree]}" 0.25)" "$(ts_ratio "$c_ts" "$c_os")"
printf 'goal treeswap apply peak memory <= 100 MB: %s KB  %s\n' "$m_ts" "$(ts_judge "$m_ts" 100000)"
echo "  (reference: ${r_cp}x cp -al; with protect: ${protect_hl:-?}: $(ts_ratio "$w_hl" "$w_rs")x rsync," \
    "$(ts_ratio "$w_hl" "$w_os")x ostree; the goals are judged on the default mode)"
