#!/usr/bin/env bash
# bench-scale.sh [N...]: how treeswap's cost grows with the tree. For synthetic trees of N
# entries (default 100000 and 1000000, from gen-tree.py, cached), measures import, diff and
# apply of a 1% change, with wall time and peak memory (/usr/bin/time -v), and `cp -al` of the
# tree in the same run for scale. Prints a table and the goals: apply time grows at most 11x
# for 10x the entries; peak memory under 300 MB at 1 000 000 entries. Warm caches: each step
# runs once after the trees were generated (no cache drop), the same for every size.
# Exit 0 either way: it is a benchmark, not a test.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT
ensure_pkgs time
build_treeswap
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(100000 1000000)
export TREESWAP_PROTECT=${TREESWAP_PROTECT:-hardlink}

# measure NAME CMD...: runs CMD under /usr/bin/time -v; sets WALL (s) and RSS (MB).
measure() {
    local name=$1 out
    shift
    out=$(mktemp)
    /usr/bin/time -v "$@" >/dev/null 2>"$out" || { cat "$out" >&2; die "$name failed"; }
    WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$out")
    RSS=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$out")
    rm -f "$out"
}

declare -A APPLY
printf '%-9s %-12s %9s %9s\n' entries step "wall s" "peak MB" > "${TMPDIR:-/tmp}/bench-scale.$$"
table="${TMPDIR:-/tmp}/bench-scale.$$"
for n in "${sizes[@]}"; do
    base=$(gen_tree_cached "$n" 1)
    ts_mktemp; work=$TS_TMP
    log "$n entries: copying and mutating 1%"
    cp -a "$base" "$work/b"
    python3 "$TS_SCRIPTS/gen-tree.py" --mutate 1 --seed 2 "$work/b" >&2
    "$TREESWAP" -q --root "$work/r" init
    measure "import" "$TREESWAP" --root "$work/r" import "$base" --version 1 --activate --no-restart
    printf '%-9s %-12s %9s %9s\n' "$n" import "$WALL" "$RSS" >> "$table"
    measure "import-b" "$TREESWAP" --root "$work/r" import "$work/b" --version 2 --no-restart
    measure "diff" "$TREESWAP" --root "$work/r" diff --from 1 --to 2 -o "$work/d.delta"
    printf '%-9s %-12s %9s %9s\n' "$n" "diff 1%" "$WALL" "$RSS" >> "$table"
    # A second device that has only version 1.
    "$TREESWAP" -q --root "$work/r2" init
    measure "import-c" "$TREESWAP" --root "$work/r2" import "$base" --version 1 --activate --no-restart
    measure "apply" "$TREESWAP" --root "$work/r2" apply "$work/d.delta" --no-restart
    printf '%-9s %-12s %9s %9s\n' "$n" "apply 1%" "$WALL" "$RSS" >> "$table"
    APPLY[$n]=$WALL
    measure "cp -al" cp -al "$base" "$work/cpal"
    printf '%-9s %-12s %9s %9s\n' "$n" "cp -al" "$WALL" "$RSS" >> "$table"
    "$TREESWAP" --root "$work/r2" verify --full >/dev/null || die "verify --full failed after apply"
    ls -la "$work/d.delta" | awk '{print "delta bytes: " $5}' >&2
    ts_cleanup
done
echo
cat "$table"
rm -f "$table"
echo "load average: $(ts_loadavg)"
if [ -n "${APPLY[100000]:-}" ] && [ -n "${APPLY[1000000]:-}" ]; then
    r=$(ts_ratio "${APPLY[1000000]}" "${APPLY[100000]}")
    echo "apply time 1M / 100k: ${r}x (goal <= 11x): $(ts_verdict "$r" 11)"
fi
