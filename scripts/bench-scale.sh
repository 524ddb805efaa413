#!/usr/bin/env bash
# bench-scale.sh [N...]: how treeswap's cost grows with the tree. For synthetic trees of N
# entries (default 100000 and 1000000, from gen-tree.py, cached), measures, each
# TREESWAP_BENCH_REPS times (default 3) on fresh state roots:
#   import        `import` of the tree into an empty root (two samples a repetition: the
#                 root that diffs and the root that applies)
#   diff          `diff --from 1 --to 2` of a 1% change, both versions installed
#   diff dirs     `diff --from-dir --to-dir` of the same two directories
#   apply         `apply` of that delta on a root that has only version 1
#   cp -al        `cp -al` of the tree, in the same run, for scale
# Every timed step ends with `sync` inside its timing (so does `cp -al`), under
# /usr/bin/time -v: wall time and peak memory. The protection mode is the default one
# (TREESWAP_PROTECT, if set, overrides it) and is printed beside every figure.
# diff and apply run with -vv: each sample's log line is followed by their phases, each with
# the time it ended (where the time went).
# Prints, per size and step, the median wall time, the samples' range and the peak memory;
# then, for the two default sizes, each step's growth for 10x the entries against its goal
# (at most 11x; PASS/MARGINAL/FAIL from every pair of samples, at least 10% either side:
# see ts_judge_times) and peak memory at 1 000 000 entries against 300 MB. After the last
# repetition, `verify --full` re-hashes the applied tree. Warm caches: the trees were just
# generated or copied; the same for every size.
# Exit 0 either way: it is a benchmark, not a test.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT
ensure_pkgs time
build_treeswap
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(100000 1000000)
reps=${TREESWAP_BENCH_REPS:-3}
steps=(import diff "diff dirs" apply "cp -al")

# measure NAME CMD...: runs CMD, then sync, under /usr/bin/time -v; sets WALL (s) and RSS
# (MB, the largest process: CMD, or sync), and STEPS to CMD's `treeswap: debug:` lines
# (with -vv, each phase and the time it ended: where the time went).
measure() {
    local name=$1 out
    shift
    out=$(mktemp)
    /usr/bin/time -v bash -c '"$@" >/dev/null && sync' bash "$@" 2>"$out" \
        || { cat "$out" >&2; die "$name failed"; }
    STEPS=$(sed -n 's/^treeswap: debug: /    /p' "$out")
    WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$out")
    RSS=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$out")
    rm -f "$out"
}

# Samples per "SIZE/STEP": wall times (space-separated) and the largest peak memory.
declare -A T M
record() {
    local key="$1/$2"
    log "$1 entries, $2: $WALL s, $RSS MB"
    [ -z "$STEPS" ] || printf '%s\n' "$STEPS" >&2
    T[$key]="${T[$key]:-} $WALL"
    [ "${M[$key]:-0}" -ge "$RSS" ] || M[$key]=$RSS
}

mode=
for n in "${sizes[@]}"; do
    base=$(gen_tree_cached "$n" 1)
    ts_mktemp; work=$TS_TMP
    log "$n entries: copying and mutating 1%"
    cp -a "$base" "$work/b"
    python3 "$TS_SCRIPTS/gen-tree.py" --mutate 1 --seed 2 "$work/b" >&2
    for rep in $(seq "$reps"); do
        log "$n entries: repetition $rep of $reps"
        r=$work/r.$rep r2=$work/r2.$rep
        "$TREESWAP" -q --root "$r" init
        [ -n "$mode" ] || mode=$("$TREESWAP" --root "$r" status --json \
            | python3 -c 'import json, sys; print(json.load(sys.stdin)["protect"])')
        measure import "$TREESWAP" --root "$r" import "$base" --version 1 --activate --no-restart
        record "$n" import
        "$TREESWAP" -q --root "$r" import "$work/b" --version 2 --no-restart
        measure diff "$TREESWAP" -vv --root "$r" diff --from 1 --to 2 -o "$work/d.delta"
        record "$n" diff
        measure "diff dirs" "$TREESWAP" -vv diff --from-dir "$base" --to-dir "$work/b" \
            --to-version 2 -o "$work/dd.delta"
        record "$n" "diff dirs"
        _ts_rm_tree "$r"
        # A second device that has only version 1.
        "$TREESWAP" -q --root "$r2" init
        measure import "$TREESWAP" --root "$r2" import "$base" --version 1 --activate --no-restart
        record "$n" import
        measure apply "$TREESWAP" -vv --root "$r2" apply "$work/d.delta" --no-restart
        record "$n" apply
        measure "cp -al" cp -al "$base" "$work/cpal"
        record "$n" "cp -al"
        _ts_rm_tree "$work/cpal"
        if [ "$rep" = "$reps" ]; then
            "$TREESWAP" -q --root "$r2" verify --full 2 || die "verify --full failed after apply"
            log "$n entries: verify --full of the applied tree passed"
            log "$n entries: delta $(stat -c %s "$work/d.delta") B (installed), $(stat -c %s "$work/dd.delta") B (dirs)"
        fi
        _ts_rm_tree "$r2"
    done
    ts_cleanup
done

echo
echo "protection mode: $mode; $reps repetitions; sync inside every timed step; warm caches"
printf '%-9s %-10s %-10s %9s %-24s %8s\n' entries mode step "median s" "range s" "peak MB"
for n in "${sizes[@]}"; do
    for s in "${steps[@]}"; do
        v=${T[$n/$s]}
        range=$(tr ' ' '\n' <<<"$v" | sed '/^$/d' | sort -g | sed -n '1p;$p' | paste -sd- -)
        printf '%-9s %-10s %-10s %9s %-24s %8s\n' "$n" "$mode" "$s" "$(ts_median "$v")" \
            "$range (spread $(ts_spread "$v"))" "${M[$n/$s]}"
    done
done
echo "load average: $(ts_loadavg)"
if [ -n "${T[100000/apply]:-}" ] && [ -n "${T[1000000/apply]:-}" ]; then
    echo "growth for 10x the entries (goal <= 11x), mode $mode:"
    for s in import diff "diff dirs" apply "cp -al"; do
        printf '  %-10s %6sx  %s\n' "$s" \
            "$(ts_ratio "$(ts_median "${T[1000000/$s]}")" "$(ts_median "${T[100000/$s]}")")" \
            "$([ "$s" = "cp -al" ] && echo "(peer, no goal)" \
                || ts_judge_times "${T[1000000/$s]}" "${T[100000/$s]}" 11)"
    done
    echo "peak memory at 1 000 000 entries (goal < 300 MB), mode $mode:"
    for s in import diff "diff dirs" apply; do
        printf '  %-10s %6s MB  %s\n' "$s" "${M[1000000/$s]}" "$(ts_verdict "${M[1000000/$s]}" 300 lt)"
    done
fi
