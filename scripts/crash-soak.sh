#!/bin/bash
# crash-soak.sh - SIGKILL `treeswap apply` at random moments of a real Debian upgrade and
# check that `treeswap boot` always leaves the old tree or the new one, never a mix.
#
# Usage: crash-soak.sh [N]        (as root; N iterations, default 100)
#
# Once: the cached bookworm minbase tree and its upgraded copy (lib.sh), a base state root
# with the minbase tree imported as version 1 and current, the delta 1 -> 2, and the time
# one apply takes (T). Then N times:
#   1. copy the base root (cp -a) to a fresh root;
#   2. start `treeswap apply DELTA` and SIGKILL it after a random delay in [0, T] (it may
#      also have finished: counted as `completed`); the kill's phase (read, objects, stage,
#      verify, commit, flip, guests) is the last failpoint the apply passed, which
#      TREESWAP_FAILPOINT_COUNT=1 writes to its stderr at every hit;
#   3. run `treeswap boot` (must exit 0);
#   4. check: `current` names version 1 or 2, whose manifest digest is the known digest of
#      the old or the new tree (taken from the delta's from/to digests), and
#      `treeswap verify --full` of it passes (so the tree on disk is exactly that manifest);
#      every other installed tree passes `verify`; `tmp/` and `staging/` are empty;
#      `previous`, if any, names an installed tree; the one guest, whose restart appends
#      the tree `current` names to a marker file, last restarted on the current tree, and
#      did restart if that is the new one;
#   5. every SOAK_RETRY_EVERY-th iteration (default 10): run the apply again, which must
#      end in a sound new tree;
#   6. every SOAK_COMPARE_EVERY-th iteration (default 25): compare `current` with the source
#      tree entry by entry with compare-trees.sh (independent of treeswap).
# Prints the counts of old / new / completed / failures and of the kills in each phase, and
# exits 1 on any failure. A root that failed a check is kept in $SOAK_KEEP (default /tmp)
# for inspection.
#
# Environment: SOAK_DIR (where the roots live; default /dev/shm, else $TMPDIR or /tmp),
# SOAK_SEED (seeds $RANDOM, for a repeatable run), SOAK_RETRY_EVERY, SOAK_COMPARE_EVERY,
# SOAK_KEEP; see lib.sh for TREESWAP and TREESWAP_CACHE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
# Pool objects may carry the immutable flag (protect = "immutable"); clear it before removing.
remove_tree() {
    chattr -R -f -i "$1" 2> /dev/null || true
    rm -rf "$1"
}
trap '[ -n "${W:-}" ] && remove_tree "$W"; ts_cleanup' EXIT

N=${1:-100}
case "$N" in '' | *[!0-9]*) die "usage: crash-soak.sh [N]" ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (the trees hold device nodes and root-owned files)"
RETRY_EVERY=${SOAK_RETRY_EVERY:-10}
COMPARE_EVERY=${SOAK_COMPARE_EVERY:-25}
KEEP=${SOAK_KEEP:-/tmp}
RANDOM=${SOAK_SEED:-$$}

old_tree=$(bookworm_tree)
new_tree=$(bookworm_upgraded_tree)
build_treeswap
# A SIGKILL tests what the process leaves behind, not what the disk keeps (tests/crash.rs
# does the remounts), so RAM is fine and much faster for copying roots back and forth.
if [ -z "${SOAK_DIR:-}" ] && [ -d /dev/shm ]; then SOAK_DIR=/dev/shm; fi
TMPDIR=${SOAK_DIR:-${TMPDIR:-/tmp}} ts_mktemp
W=$TS_TMP
CFG="$W/treeswap.toml"
R="$W/root"
MARK="$W/guest.log"
# One guest, default boot tries. Its restart really runs: it appends the tree `current`
# names to a marker file (no shell is involved in treeswap's argv; sh here is the guest).
cat > "$CFG" << EOF
[[guest]]
name = "soak"
restart = ["/bin/sh", "-c", "echo \"\$(readlink \"\$0/current\")\" >> \"\$1\"", "$R", "$MARK"]
timeout = 20
EOF
ts() { "$TREESWAP" --config "$CFG" -q "$@"; }

# The base root and the delta.
t0=$(ts_now)
ts --root "$W/base" init
ts --root "$W/base" import "$old_tree" --version 1 --activate
"$TREESWAP" -q diff --from-dir "$old_tree" --to-dir "$new_tree" \
    --from-version 1 --to-version 2 -o "$W/1-2.delta"
t1=$(ts_now)
log "base root and delta ready in $(ts_elapsed "$t0" "$t1") s ($(du -sh "$W/1-2.delta" | cut -f1) delta)"

# The digests of the two trees, from the delta (checked against the imported base).
digest_of_delta() { tar xOf "$W/1-2.delta" delta.toml | sed -n "s/^$1 = \"\\([0-9a-f]*\\)\"/\\1/p"; }
manifest_digest() { sed -n 's/^digest = "\([0-9a-f]*\)"/\1/p' "$1/manifests/$2.toml" | head -n1; }
D_OLD=$(digest_of_delta from_digest)
D_NEW=$(digest_of_delta to_digest)
if [ -z "$D_OLD" ] || [ -z "$D_NEW" ]; then die "cannot read the digests of the delta"; fi
[ "$(manifest_digest "$W/base" 1)" = "$D_OLD" ] || die "the imported base does not have the delta's from_digest"

# How long one apply takes: the range of the random delay. The slowest of three, with the
# hits written to stderr as in the soak: on a busy machine a single run can be quick enough
# that no kill lands after the flip (the phase counts at the end show where they landed).
T=0
for _ in 1 2 3; do
    cp -a "$W/base" "$W/timing"
    t0=$(ts_now)
    TREESWAP_FAILPOINT_COUNT=1 ts --root "$W/timing" apply "$W/1-2.delta" 2> /dev/null
    t1=$(ts_now)
    T=$(awk -v a="$T" -v b="$(ts_elapsed "$t0" "$t1")" 'BEGIN { print (b > a ? b : a) }')
    [ "$(manifest_digest "$W/timing" 2)" = "$D_NEW" ] || die "a complete apply does not give the new digest"
    remove_tree "$W/timing"
done
log "one apply takes $T s; killing at a random moment in [0, $T] s, $N times (load $(ts_loadavg))"

n_old=0 n_new=0 n_done=0 n_fail=0
PHASES="read objects stage verify commit flip guests done"
declare -A n_phase
for p in $PHASES; do n_phase[$p]=0; done

# phase_of LOG RC: the phase the apply was in when it stopped, from the last failpoint it
# passed (state-* are passed in several phases and say nothing of their own).
phase_of() {
    local last
    [ "$2" = 0 ] && { echo done; return; }
    last=$(sed -n 's/^treeswap: failpoint `\([a-z-]*\)` hit [0-9]*$/\1/p' "$1" \
        | grep -v '^state-' | tail -n1 || true)
    case "$last" in
        "") echo read ;; # reading the delta, planning, before the first object is written
        apply-after-object) echo objects ;;
        # In immutable mode, objects are written while the tree is linked.
        apply-after-objects | pool-link-unprotected) echo stage ;;
        stage-after-build) echo verify ;;
        stage-before-syncfs | stage-after-syncfs | stage-before-commit) echo commit ;;
        stage-after-commit | flip-*) echo flip ;;
        guest-*) echo guests ;;
        *) echo "after-$last" ;;
    esac
}

# check I: prints nothing and returns 0 if the root is sound; else prints the problems.
check() {
    local i=$1 cur digest want v d left
    cur=$(readlink "$R/current" || true)
    v=${cur#trees/}
    case "$v" in
        1) want=$D_OLD ;;
        2) want=$D_NEW ;;
        *) echo "current is '$cur', neither trees/1 nor trees/2"; return 1 ;;
    esac
    digest=$(manifest_digest "$R" "$v")
    [ "$digest" = "$want" ] || { echo "manifests/$v.toml has digest $digest, want $want"; return 1; }
    ts --root "$R" verify "$v" --full || { echo "verify --full $v failed"; return 1; }
    for d in "$R"/trees/*; do
        [ "${d##*/}" = "$v" ] && continue
        ts --root "$R" verify "${d##*/}" || { echo "verify ${d##*/} failed"; return 1; }
    done
    for d in tmp staging; do
        left=$(find "$R/$d" -mindepth 1 -maxdepth 1 | head -n3)
        [ -z "$left" ] || { echo "$d/ is not empty: $left"; return 1; }
    done
    if [ -L "$R/previous" ] && [ ! -d "$R/$(readlink "$R/previous")" ]; then
        echo "previous dangles: $(readlink "$R/previous")"
        return 1
    fi
    # boot finishes the restarts a kill cut short; one that never flipped restarts nothing.
    local guest
    guest=$(tail -n1 "$MARK" 2> /dev/null || true)
    if [ -n "$guest" ] && [ "$guest" != "$cur" ]; then
        echo "the guest last restarted on '$guest', not on the current '$cur'"
        return 1
    fi
    if [ "$v" = 2 ] && [ -z "$guest" ]; then
        echo "current is the new tree, but the guest never restarted"
        return 1
    fi
    if [ $((i % COMPARE_EVERY)) -eq 0 ]; then
        local src=$old_tree
        [ "$v" = 2 ] && src=$new_tree
        "$TS_SCRIPTS/compare-trees.sh" --max-diffs 5 "$src" "$R/trees/$v" > /dev/null \
            || { echo "compare-trees.sh: trees/$v differs from $src"; return 1; }
    fi
    echo "$v"
}

t_start=$(ts_now)
for ((i = 1; i <= N; i++)); do
    remove_tree "$R"
    cp -a "$W/base" "$R"
    rm -f "$MARK"
    delay=$(awk -v r="$RANDOM" -v t="$T" 'BEGIN { printf "%.3f", r / 32767 * t }')
    TREESWAP_FAILPOINT_COUNT=1 "$TREESWAP" --root "$R" --config "$CFG" -q apply "$W/1-2.delta" \
        > "$W/apply.log" 2>&1 &
    pid=$!
    sleep "$delay"
    kill -9 "$pid" 2> /dev/null || true
    rc=0
    # (The braces keep bash's "Killed" job notice off the terminal.)
    { wait "$pid" || rc=$?; } 2> /dev/null
    problem=""
    case $rc in
        0) n_done=$((n_done + 1)) ;;
        137) ;;
        *) problem="apply exited $rc before the kill: $(tail -n1 "$W/apply.log")" ;;
    esac
    phase=$(phase_of "$W/apply.log" "$rc")
    n_phase[$phase]=$((${n_phase[$phase]:-0} + 1))
    if [ -z "$problem" ] && ! ts --root "$R" boot > "$W/boot.log" 2>&1; then
        problem="boot failed: $(tail -n1 "$W/boot.log")"
    fi
    if [ -z "$problem" ]; then
        out=$(check "$i" 2>&1) || problem=$(echo "$out" | tr '\n' ' ')
    fi
    if [ -z "$problem" ]; then
        case "${out##*$'\n'}" in
            1) n_old=$((n_old + 1)) ;;
            2) n_new=$((n_new + 1)) ;;
        esac
        if [ $((i % RETRY_EVERY)) -eq 0 ]; then
            rc=0
            ts --root "$R" apply "$W/1-2.delta" 2> "$W/retry.log" || rc=$?
            if [ "$rc" != 0 ] && [ "$rc" != 4 ]; then
                problem="apply again exited $rc: $(tail -n1 "$W/retry.log")"
            elif [ "$(readlink "$R/current")" != trees/2 ] \
                || ! ts --root "$R" verify 2 --full; then
                problem="apply again did not end in a sound trees/2"
            fi
        fi
    fi
    if [ -n "$problem" ]; then
        n_fail=$((n_fail + 1))
        keep="$KEEP/crash-soak-fail.$$.$i"
        cp -a "$R" "$keep"
        log "iteration $i (kill after $delay s in phase $phase, apply rc $rc): FAIL: $problem (root kept in $keep)"
    fi
    if [ $((i % 10)) -eq 0 ]; then
        log "$i/$N: old $n_old, new $n_new (of which completed $n_done), failures $n_fail"
    fi
done
t_end=$(ts_now)
remove_tree "$R"
echo "crash-soak: $N iterations in $(ts_elapsed "$t_start" "$t_end") s: old $n_old, new $n_new" \
    "(completed before the kill: $n_done), failures $n_fail"
counts=""
for p in $PHASES; do counts+=" $p ${n_phase[$p]},"; done
for p in "${!n_phase[@]}"; do
    case " $PHASES " in *" $p "*) ;; *) counts+=" $p ${n_phase[$p]}," ;; esac
done
echo "crash-soak: kills by phase:${counts%,}"
[ "$n_fail" -eq 0 ]
