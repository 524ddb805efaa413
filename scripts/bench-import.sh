#!/bin/bash
# bench-import.sh - time treeswap against OSTree and cp -al on a real Debian tree.
#
# Usage: bench-import.sh [REPS]       (as root; REPS defaults to 3)
#
# In one run, on the debootstrap --variant=minbase bookworm tree from lib.sh:
#   (a) `treeswap import` into a fresh root   vs  `ostree commit` into a fresh
#       `ostree init --mode=bare` repo
#   (b) `treeswap checkout V DEST`            vs  `cp -al SRC DEST` of the same tree
#       (and, for reference only, `ostree checkout -H`). cp -al copies the source,
#       not trees/V: the kernel refuses to link immutable inodes, and treeswap marks
#       its pool objects immutable (chattr +i) where it can.
# OSTree refuses device nodes, fifos and sockets, so both tools get the same copy
# of the tree with those removed (the count is printed).
#
# Method: cold cache. Before every timed step: `sync; echo 3 > drop_caches`. A timed
# step is the command followed by `sync`, so writeback a tool leaves to the kernel
# is counted like the fsyncs another tool does itself. Each step is run REPS times,
# alternating tools, in fresh roots/repos/destinations; the median is reported.
# Goals: import <= 1.5x ostree commit; tree build <= 1.5x cp -al. Prints PASS/FAIL
# per goal and exits 0 either way (a benchmark, not a test); exits non-zero only if
# a command fails.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

REPS=${1:-3}
[ "$(id -u)" = 0 ] || die "must run as root (drop_caches, root-owned trees)"
ensure_pkgs ostree
tree=$(bookworm_tree)
build_treeswap
ts_mktemp
W=$TS_TMP
V=bench

log "copying $tree without device nodes, fifos and sockets"
cp -a "$tree" "$W/src"
removed=$(find "$W/src" \( -type c -o -type b -o -type p -o -type s \) -print -delete | wc -l)
entries=$(find "$W/src" -mindepth 1 | wc -l)
size=$(du -s --apparent-size -B1M "$W/src" | cut -f1)

load_before=$(ts_loadavg)
declare -A samples
# timed KEY CMD...: drop caches, run CMD then sync, append the seconds to samples[KEY].
timed() {
    local key=$1 t0 t1
    shift
    drop_caches
    t0=$(ts_now)
    "$@" > "$W/last.out" 2>&1 || { cat "$W/last.out" >&2; die "failed: $*"; }
    sync
    t1=$(ts_now)
    samples[$key]+="$(ts_elapsed "$t0" "$t1") "
}
median() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for ((i = 1; i <= REPS; i++)); do
    log "round $i/$REPS"
    for d in ts repo co-ts co-cp co-ostree; do _ts_rm_tree "$W/$d"; done
    "$TREESWAP" --root "$W/ts" init
    ostree --repo="$W/repo" init --mode=bare
    # Alternate which tool goes first, so neither always profits from the other's
    # side effects (allocator state, journal).
    if ((i % 2)); then
        timed ts_import "$TREESWAP" --root "$W/ts" import "$W/src" --version "$V"
        timed ostree_commit ostree --repo="$W/repo" commit --branch=bench --tree=dir="$W/src"
    else
        timed ostree_commit ostree --repo="$W/repo" commit --branch=bench --tree=dir="$W/src"
        timed ts_import "$TREESWAP" --root "$W/ts" import "$W/src" --version "$V"
    fi
    if ((i % 2)); then
        timed ts_checkout "$TREESWAP" --root "$W/ts" checkout "$V" "$W/co-ts"
        timed cp_al cp -al "$W/src" "$W/co-cp"
    else
        timed cp_al cp -al "$W/src" "$W/co-cp"
        timed ts_checkout "$TREESWAP" --root "$W/ts" checkout "$V" "$W/co-ts"
    fi
    timed ostree_checkout ostree --repo="$W/repo" checkout -H bench "$W/co-ostree"
done

# Sanity: the checkout is the tree (a benchmark of a wrong result is worthless).
"$TS_SCRIPTS/compare-trees.sh" "$W/src" "$W/co-ts" > "$W/cmp.out" \
    || { head -20 "$W/cmp.out" >&2; die "treeswap checkout differs from the source"; }

m_imp=$(median "${samples[ts_import]}")
m_ost=$(median "${samples[ostree_commit]}")
m_co=$(median "${samples[ts_checkout]}")
m_cp=$(median "${samples[cp_al]}")
m_oco=$(median "${samples[ostree_checkout]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
verdict() { awk -v r="$1" -v g="$2" 'BEGIN { print (r != "inf" && r <= g) ? "PASS" : "FAIL" }'; }
r_imp=$(ratio "$m_imp" "$m_ost")
r_co=$(ratio "$m_co" "$m_cp")

echo
echo "tree: $tree minus $removed device/fifo/socket entries: $entries entries, ${size} MiB"
echo "method: cold cache (drop_caches before each step), command + sync, median of $REPS"
echo "load average before: $load_before, after: $(ts_loadavg) ($(nproc) CPUs)"
echo "treeswap: $("$TREESWAP" --version 2>/dev/null || echo "$TREESWAP");" \
    "ostree: $(ostree --version | sed -n "s/^ *Version: *//p" | tr -d "'")"
printf '%-34s %8s   %s\n' step "median s" "samples (s)"
printf '%-34s %8s   %s\n' "treeswap import" "$m_imp" "${samples[ts_import]}"
printf '%-34s %8s   %s\n' "ostree commit (bare)" "$m_ost" "${samples[ostree_commit]}"
printf '%-34s %8s   %s\n' "treeswap checkout" "$m_co" "${samples[ts_checkout]}"
printf '%-34s %8s   %s\n' "cp -al" "$m_cp" "${samples[cp_al]}"
printf '%-34s %8s   %s\n' "ostree checkout -H (reference)" "$m_oco" "${samples[ostree_checkout]}"
echo
printf 'goal import     <= 1.5x ostree commit: %5sx  %s\n' "$r_imp" "$(verdict "$r_imp" 1.5)"
printf 'goal tree build <= 1.5x cp -al:        %5sx  %s\n' "$r_co" "$(verdict "$r_co" 1.5)"
