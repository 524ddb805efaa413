#!/bin/bash
# bench-delta.sh - making a delta for a real Debian point-release update: treeswap diff
# against OSTree's static delta, in size and in time.
#
# Usage: bench-delta.sh [REPS] [PAIR]   (as root; any cwd; REPS defaults to 3)
#
# The update (PAIR): `point` (the default), the cached debootstrap --variant=minbase
# bookworm tree and its copy after a real `apt-get upgrade` with bookworm-updates and
# bookworm-security; `packages`, the same minbase tree and its copy with lib.sh's
# TS_PACKAGES installed (new software: mostly new files, no references); `release`, the
# same minbase tree and a `debootstrap --variant=minbase trixie` tree (a release upgrade);
# `kiosk-point`, the packages tree (minbase + TS_PACKAGES from the point release) and its
# copy after the same real `apt-get upgrade` as `point`: the point-release update of a
# bigger image (lib.sh's bookworm_packages_tree, bookworm_packages_upgraded_tree). OSTree refuses device nodes, so both tools get copies
# of both trees with device nodes, FIFOs and sockets removed (the count is printed).
# Untimed setup: the two trees imported into a treeswap root as versions 1 and 2, and
# committed into a bare OSTree repo. Timed, each REPS times:
#   treeswap diff --from 1 --to 2            (from the two INSTALLED versions: the
#                                             headline figure, since OSTree likewise
#                                             starts from two commits in its repo)
#   treeswap diff --from-dir --to-dir        (from the directories, hashing both trees;
#                                             for reference)
#   ostree static-delta generate --inline --min-fallback-size=0 --from=BASE --to=NEW
#       --filename=FILE
# Method: COLD cache: `sync; echo 3 > drop_caches` before every timed step; the step is
# the command then `sync`; the order of the tools alternates between rounds; the median
# wall time is reported (CPU time too, as the machine may be shared). Sizes are the
# files' bytes (and, for reference, their `zstd -19` sizes and treeswap's breakdown).
# The treeswap delta is checked by applying it to a root holding only the base and
# comparing the result with the new tree entry by entry.
# Goals (issue 17): treeswap delta bytes / ostree delta bytes <= 0.60 (moonshot 0.50);
# treeswap diff time / ostree generate time <= 0.2; diff's peak memory <= 1 GB. Prints
# PASS, MARGINAL (a time whose samples put it on either side of its goal, the range at
# least 10% either side of the median ratio: lib.sh's ts_judge_times) or FAIL per goal and exits 0 either way (a benchmark); non-zero only if a command fails
# or a result is wrong.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

REPS=${1:-3}
PAIR=${2:-point}
[[ $REPS =~ ^[1-9][0-9]*$ && $PAIR =~ ^(point|packages|release|kiosk-point)$ ]] \
    || { echo "usage: $0 [REPS] [point|packages|release|kiosk-point]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (drop_caches, root-owned trees)"
ensure_pkgs ostree zstd
base_src=$(bookworm_tree)
case $PAIR in
point) new_src=$(bookworm_upgraded_tree) ;;
packages) new_src=$(bookworm_packages_tree) ;;
release) new_src=$(trixie_tree) ;;
kiosk-point)
    base_src=$(bookworm_packages_tree)
    new_src=$(bookworm_packages_upgraded_tree)
    ;;
esac
build_treeswap
ts_mktemp
W=$TS_TMP

log "copying both trees without device nodes, fifos and sockets"
n_base=$(ts_copy_without_specials "$base_src" "$W/base")
n_new=$(ts_copy_without_specials "$new_src" "$W/new")
log "setup (untimed): treeswap import of both trees, ostree commit of both trees"
"$TREESWAP" -q --root "$W/ts" init
"$TREESWAP" -q --root "$W/ts" import "$W/base" --version 1
"$TREESWAP" -q --root "$W/ts" import "$W/new" --version 2
ostree --repo="$W/repo" init --mode=bare
ostree --repo="$W/repo" commit --branch=base --tree=dir="$W/base" > /dev/null
ostree --repo="$W/repo" commit --branch=new --tree=dir="$W/new" > /dev/null
BASEC=$(ostree --repo="$W/repo" rev-parse base)
NEWC=$(ostree --repo="$W/repo" rev-parse new)

ensure_pkgs time
declare -A wall cpu size rss
# timed KEY OUTFILE CMD...: drop caches, remove OUTFILE, run CMD then sync (GNU time around
# both); append the wall and CPU seconds, the peak resident memory (KB) and OUTFILE's size.
timed() {
    local key=$1 out=$2 t
    shift 2
    rm -f "$out"
    drop_caches
    /usr/bin/time -f '%e %U %S %M' -o "$W/time.out" bash -c '"$@" && sync' bash "$@" \
        > "$W/last.out" 2>&1 || { tail -20 "$W/last.out" >&2; die "failed: $*"; }
    t=$(tail -1 "$W/time.out")
    wall[$key]+="$(awk '{ printf "%.2f", $1 }' <<<"$t") "
    cpu[$key]+="$(awk '{ printf "%.2f", $2 + $3 }' <<<"$t") "
    rss[$key]+="$(awk '{ print $4 }' <<<"$t") "
    size[$key]+="$(stat -c %s "$out") "
}
ts_installed() {
    timed ts_installed "$W/ts-installed.delta" "$TREESWAP" -v --root "$W/ts" diff \
        --from 1 --to 2 -o "$W/ts-installed.delta"
    cp "$W/last.out" "$W/diff.log"
}
ts_dirs() {
    timed ts_dirs "$W/ts-dirs.delta" "$TREESWAP" diff --from-dir "$W/base" --to-dir "$W/new" \
        --from-version 1 --to-version 2 -o "$W/ts-dirs.delta"
}
ostree_gen() {
    timed ostree "$W/ostree.delta" ostree --repo="$W/repo" static-delta generate --inline \
        --min-fallback-size=0 --from="$BASEC" --to="$NEWC" --filename="$W/ostree.delta"
}

load_before=$(ts_loadavg)
for ((i = 1; i <= REPS; i++)); do
    log "round $i/$REPS"
    if ((i % 2)); then
        ts_installed; ts_dirs; ostree_gen
    else
        ostree_gen; ts_dirs; ts_installed
    fi
done
load_after=$(ts_loadavg)

# The treeswap delta must make the new tree (the ostree one is checked by bench-apply.sh).
log "checking the treeswap delta: apply to a root holding only the base, compare"
"$TREESWAP" -q --root "$W/check" init
"$TREESWAP" -q --root "$W/check" import "$W/base" --version 1 --activate
"$TREESWAP" -q --root "$W/check" apply "$W/ts-installed.delta" --no-restart
"$TS_SCRIPTS/compare-trees.sh" "$W/new" "$W/check/current/" > "$W/cmp.out" \
    || { head -20 "$W/cmp.out" >&2; die "the treeswap delta does not make the new tree"; }
same=identical
cmp -s "$W/ts-installed.delta" "$W/ts-dirs.delta" || same="NOT identical"

uniq_sizes() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -u | tr '\n' ' '; }
s_ts=$(ts_median "${size[ts_installed]}")
s_os=$(ts_median "${size[ostree]}")
w_ti=$(ts_median "${wall[ts_installed]}"); c_ti=$(ts_median "${cpu[ts_installed]}")
w_td=$(ts_median "${wall[ts_dirs]}"); c_td=$(ts_median "${cpu[ts_dirs]}")
w_os=$(ts_median "${wall[ostree]}"); c_os=$(ts_median "${cpu[ostree]}")
r_size=$(ts_ratio "$s_ts" "$s_os")
r_time=$(ts_ratio "$w_ti" "$w_os")
m_ti=$(tr ' ' '\n' <<<"${rss[ts_installed]}" | sort -n | tail -1)
m_td=$(tr ' ' '\n' <<<"${rss[ts_dirs]}" | sort -n | tail -1)

toml=$(tar xOf "$W/ts-installed.delta" delta.toml | wc -c)
blobs=$(tar tvf "$W/ts-installed.delta" | awk '$6 ~ /^blobs\// { s += $3; n++ } END { print s + 0, n + 0 }')
read -r blob_bytes blob_count <<<"$blobs"

echo
echo "update ($PAIR): $base_src -> $new_src"
echo "  both copied without device nodes/fifos/sockets ($n_base removed from the base," \
    "$n_new from the new tree): $(find "$W/new" | wc -l) entries," \
    "$(du -s --apparent-size -B1M "$W/new" | cut -f1) MiB"
sed -n 's/^treeswap: info: /  treeswap /p' "$W/diff.log"
echo "method: cold cache (drop_caches before each step), command + sync, median of $REPS"
echo "load average before: $load_before, after: $load_after ($(nproc) CPUs)"
echo "treeswap: $("$TREESWAP" --version 2>/dev/null || echo "$TREESWAP");" \
    "ostree: $(ostree --version | sed -n "s/^ *Version: *//p" | tr -d "'")"
echo
printf '%-46s %10s %10s\n' delta bytes "zstd -19"
printf '%-46s %10s %10s\n' "treeswap (installed versions 1 -> 2)" "$s_ts" \
    "$(zstd -19 -q -c "$W/ts-installed.delta" | wc -c)"
printf '%-46s %10s %10s\n' "ostree static-delta --inline" "$s_os" \
    "$(zstd -19 -q -c "$W/ostree.delta" | wc -c)"
echo "  treeswap breakdown: delta.toml $toml B, $blob_count blobs $blob_bytes B," \
    "tar headers and padding $((s_ts - toml - blob_bytes)) B"
echo "  sizes seen: treeswap installed: $(uniq_sizes "${size[ts_installed]}")/ dirs:" \
    "$(uniq_sizes "${size[ts_dirs]}")/ ostree: $(uniq_sizes "${size[ostree]}")"
echo "  treeswap delta from installed versions and from dirs: $same"
echo "  the treeswap delta applied to the base makes the new tree: $(tail -1 "$W/cmp.out")"
echo
printf '%-46s %7s %7s %9s   %s\n' "generation" "wall s" "cpu s" "peak KB" "wall samples (s), spread"
printf '%-46s %7s %7s %9s   %s\n' "treeswap diff --from 1 --to 2 (installed)" "$w_ti" "$c_ti" "$m_ti" "${wall[ts_installed]}, $(ts_spread "${wall[ts_installed]}")"
printf '%-46s %7s %7s %9s   %s\n' "treeswap diff --from-dir --to-dir (reference)" "$w_td" "$c_td" "$m_td" "${wall[ts_dirs]}, $(ts_spread "${wall[ts_dirs]}")"
printf '%-46s %7s %7s %9s   %s\n' "ostree static-delta generate" "$w_os" "$c_os" "$(tr ' ' '\n' <<<"${rss[ostree]}" | sort -n | tail -1)" "${wall[ostree]}, $(ts_spread "${wall[ostree]}")"
echo
printf 'goal size: treeswap / ostree <= 0.60:         %6sx  %s   (moonshot 0.50: %s; sizes are exact)\n' \
    "$r_size" "$(ts_judge "$r_size" 0.60)" "$(ts_judge "$r_size" 0.50)"
printf 'goal time: treeswap diff / ostree gen <= 0.2:  %6sx  %s   (cpu: %sx; from dirs: %sx wall)\n' \
    "$r_time" "$(ts_judge_times "${wall[ts_installed]}" "${wall[ostree]}" 0.2)" \
    "$(ts_ratio "$c_ti" "$c_os")" "$(ts_ratio "$w_td" "$w_os")"
printf 'goal memory: treeswap diff peak <= 1 GB:   %8s KB  %s   (from dirs: %s KB)\n' \
    "$m_ti" "$(ts_judge "$m_ti" 1000000)" "$m_td"
