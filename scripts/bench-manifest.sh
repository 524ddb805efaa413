#!/bin/bash
# bench-manifest.sh - time loading a whole-tree manifest of a large synthetic tree.
#
# Usage: bench-manifest.sh [N [REPS]]    (N entries, default 1000000; REPS default 3)
#
# Generates (once; cached under $TREESWAP_CACHE, keyed by N and by gen-tree.py's
# hash) a tree of N entries with gen-tree.py --seed 1, writes its manifest with
# `treeswap manifest DIR > m.toml`, then runs `treeswap manifest --load m.toml`
# REPS times under /usr/bin/time -v.
# Method: warm cache (m.toml was just written), median wall time and the largest
# peak RSS of the runs. Goals: wall < 2 s, peak RSS < 300 MB (10^6 bytes).
# Prints PASS/FAIL per goal and exits 0 either way; non-zero only if a command fails.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

N=${1:-1000000}
REPS=${2:-3}
ensure_pkgs time
tree=$(gen_tree_cached "$N" 1)
build_treeswap
ts_mktemp
W=$TS_TMP

log "treeswap manifest $tree > m.toml"
t0=$(ts_now)
"$TREESWAP" manifest "$tree" > "$W/m.toml"
t1=$(ts_now)
gen_s=$(ts_elapsed "$t0" "$t1")

load_before=$(ts_loadavg)
walls=() cpus=() rss_max=0
for ((i = 1; i <= REPS; i++)); do
    /usr/bin/time -v -o "$W/time.out" "$TREESWAP" manifest --load "$W/m.toml" \
        > "$W/load.out" 2>&1 || { cat "$W/load.out" "$W/time.out" >&2; die "manifest --load failed"; }
    # "Elapsed (wall clock) time (h:mm:ss or m:ss): 0:01.23"
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' \
        "$W/time.out")
    cpu=$(awk -F': ' '/User time|System time/ { s += $2 } END { printf "%.2f", s }' "$W/time.out")
    cpus+=("$cpu")
    rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$W/time.out")
    walls+=("$wall")
    ((rss > rss_max)) && rss_max=$rss
done
wall_med=$(printf '%s\n' "${walls[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
rss_mb=$(awk -v k="$rss_max" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }')
verdict() { awk -v v="$1" -v g="$2" 'BEGIN { print (v < g) ? "PASS" : "FAIL" }'; }

echo
echo "tree: $tree ($N entries, $(du -s --apparent-size -B1M "$tree" | cut -f1) MiB)"
echo "manifest: $(awk -v b="$(stat -c %s "$W/m.toml")" 'BEGIN { printf "%.1f", b / 1048576 }') MiB," \
    "$(wc -l < "$W/m.toml") lines;" \
    "written by \`treeswap manifest DIR\` in ${gen_s}s"
echo "load output: $(head -c 300 "$W/load.out" | head -3)"
echo "method: warm cache, $REPS runs; wall samples (s): ${walls[*]};" \
    "user+sys CPU (s): ${cpus[*]}"
echo "load average before: $load_before, after: $(ts_loadavg) ($(nproc) CPUs)"
printf 'goal manifest --load wall < 2 s:      %6ss   %s\n' "$wall_med" "$(verdict "$wall_med" 2)"
printf 'goal manifest --load peak RSS < 300 MB: %6s MB %s\n' "$rss_mb" "$(verdict "$rss_mb" 300)"
