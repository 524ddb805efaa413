#!/bin/bash
# real-os-import.sh - import a real Debian tree into treeswap and check that nothing
# was lost, using compare-trees.sh (which does not use treeswap).
#
# Usage: real-os-import.sh            (as root)
#
# Steps, each printed with PASS/FAIL:
#   1. debootstrap --variant=minbase bookworm (cached by lib.sh) and the same tree
#      after a real point-release upgrade (also cached)
#   2. treeswap init + import of the base tree as version "base" into a fresh root;
#      trees/base must equal the source entry by entry
#   3. treeswap import of the upgraded tree as "upgraded"; trees/upgraded must equal
#      its source, and trees/base must still equal the base tree (shared pool objects
#      were not disturbed)
#   4. treeswap verify --full
#   5. treeswap checkout base DEST; DEST must equal the base tree
#   6. the source trees are unchanged, mtimes and inode flags (chattr) included
#      (snapshot before vs after)
#   7. pool objects refuse writes when immutable, and verify --full catches a
#      corrupted object (exit status 3)
# Exits 1 if any step fails. Environment: see lib.sh (TREESWAP_CACHE, TREESWAP, ...).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

[ "$(id -u)" = 0 ] || die "must run as root (the trees hold device nodes and root-owned files)"
ensure_pkgs attr
CMP="$TS_SCRIPTS/compare-trees.sh"

base=$(bookworm_tree)
upgraded=$(bookworm_upgraded_tree)
build_treeswap
ts_mktemp
W=$TS_TMP
R="$W/root"

failures=0
step() {  # step NAME CMD...: run CMD, print its output indented and PASS/FAIL
    local name=$1 out rc t0 t1
    shift
    t0=$(ts_now)
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    t1=$(ts_now)
    if [ -n "$out" ]; then
        printf '%s\n' "$out" | head -n 40 | sed 's/^/    /'
    fi
    if [ "$rc" -eq 0 ]; then
        printf 'PASS  %-58s %6.2fs\n' "$name" "$(ts_elapsed "$t0" "$t1")"
    else
        printf 'FAIL  %-58s (exit %d)\n' "$name" "$rc"
        failures=$((failures + 1))
    fi
    return 0
}

echo "source trees: $base ($(find "$base" | wc -l) entries), $upgraded"
step "snapshot of the base source (before)" "$CMP" --save "$W/base.before" "$base"
step "snapshot of the upgraded source (before)" "$CMP" --save "$W/upg.before" "$upgraded"

step "treeswap init" "$TREESWAP" --root "$R" init
step "treeswap import base tree" "$TREESWAP" --root "$R" import "$base" --version base
step "trees/base == source (compare-trees)" "$CMP" "$base" "$R/trees/base"
step "treeswap import upgraded tree" \
    "$TREESWAP" --root "$R" import "$upgraded" --version upgraded --activate
step "trees/upgraded == upgraded source" "$CMP" "$upgraded" "$R/trees/upgraded"
step "trees/base still == source after 2nd import" "$CMP" "$base" "$R/trees/base"
step "treeswap verify base --full" "$TREESWAP" --root "$R" verify base --full
step "treeswap verify upgraded --full" "$TREESWAP" --root "$R" verify upgraded --full
step "treeswap checkout base DEST" "$TREESWAP" --root "$R" checkout base "$W/checkout"
step "checkout == source" "$CMP" "$base" "$W/checkout"
step "treeswap status --json" "$TREESWAP" --root "$R" status --json
step "base source unchanged (mtimes, inode flags too)" \
    "$CMP" --mtime --flags "$W/base.before" "$base"
step "upgraded source unchanged (mtimes, flags too)" \
    "$CMP" --mtime --flags "$W/upg.before" "$upgraded"

# Last, because it damages the temp root: verify must notice a changed object.
# Guard first that the object is not the source's own inode (an import that
# hardlinked the source into the pool would make this corrupt the cached tree).
victim="$R/trees/base/usr/bin/ls"
if [ "$(stat -c %d:%i "$victim")" = "$(stat -c %d:%i "$base/usr/bin/ls")" ]; then
    echo "FAIL  trees/base/usr/bin/ls is the source's own inode (import linked the source)"
    failures=$((failures + 1))
else
    echo "pool protection of usr/bin/ls: $(lsattr -d "$victim" 2>&1 | cut -d' ' -f1)"
    if lsattr -d "$victim" 2>/dev/null | cut -d' ' -f1 | grep -q i; then
        append_refused() {
            if printf 'X' 2>/dev/null >> "$victim"; then
                echo "append to an immutable object succeeded"; return 1
            fi
            echo "append refused, as it should be"
        }
        step "immutable pool object refuses writes" append_refused
        chattr -i "$victim"   # corrupt it the way a bypass (or a bad disk) would
    fi
    printf 'X' >> "$victim"
    expect_exit3() {
        local rc=0
        "$TREESWAP" --root "$R" verify base --full || rc=$?
        echo "verify exit status $rc (want 3)"
        [ "$rc" -eq 3 ]
    }
    step "verify --full detects a corrupted object (exit 3)" expect_exit3
fi

echo "pool: $(find "$R/pool" -type f | wc -l) objects, $(du -sh "$R/pool" | cut -f1);" \
    "sources: $(du -sh "$base" | cut -f1) + $(du -sh "$upgraded" | cut -f1)"
if [ "$failures" -eq 0 ]; then
    echo "real-os-import: all steps passed"
else
    echo "real-os-import: $failures step(s) FAILED"
    exit 1
fi
