#!/bin/bash
# real-upgrade-test.sh - a real Debian point-release update through treeswap, checked
# entry by entry.
#
# Usage: real-upgrade-test.sh            (as root; any cwd)
#
# Takes the cached debootstrap --variant=minbase bookworm tree and its copy after a real
# `apt-get upgrade` (bookworm_tree / bookworm_upgraded_tree from lib.sh, built on first
# use), then in a fresh state root:
#   1. import the base as version 1 (--activate)
#   2. diff --from-dir BASE --to-dir UPGRADED (version 1 -> 2), print the delta's size
#      and what it shipped, and check independently that the delta lists exactly the
#      paths that differ between the two trees (no more, no fewer)
#   3. apply the delta (--no-restart); compare root/current with the upgraded tree
#      (compare-trees.sh, every entry, metadata, xattrs, hardlink groups); verify --full
#   4. revert (--no-restart); compare root/current with the base tree; verify --full
# The trees keep their /dev device nodes: treeswap handles them.
# Exits 0 with "PASS" if everything matches; non-zero at the first mismatch or failure.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT

[ "$(id -u)" = 0 ] || die "must run as root (device nodes, owners)"
[ $# -eq 0 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

base=$(bookworm_tree)
new=$(bookworm_upgraded_tree)
build_treeswap
ts_mktemp
W=$TS_TMP
R=$W/root
D=$W/delta.tar
ts() { "$TREESWAP" --root "$R" "$@"; }
# compare A B: A is the source tree, B what treeswap built (B may join identical
# files into one inode, so only A's hardlink groups must hold in B).
compare() {
    local what=$1 a=$2 b=$3
    if "$TS_SCRIPTS/compare-trees.sh" "$a" "$b" > "$W/cmp.out"; then
        echo "ok: $what: $(tail -1 "$W/cmp.out")"
    else
        head -40 "$W/cmp.out" >&2
        die "MISMATCH: $what"
    fi
}
step() { echo; echo "== $*"; }

step "packages the upgrade changed"
if [ -r "$TS_CACHE/bookworm-minbase.versions" ] && [ -r "$TS_CACHE/bookworm-upgraded-apt-caches.versions" ]; then
    awk 'NR == FNR { v[$1] = $2; next }
         v[$1] != $2 { printf "  %-20s %s -> %s\n", $1, ($1 in v) ? v[$1] : "(new)", $2 }' \
        "$TS_CACHE/bookworm-minbase.versions" "$TS_CACHE/bookworm-upgraded-apt-caches.versions"
else
    echo "  (no .versions files in $TS_CACHE)"
fi

step "import $base as version 1 (--activate)"
t0=$(ts_now)
ts init
ts import "$base" --version 1 --activate
echo "import: $(ts_elapsed "$t0" "$(ts_now)") s"
compare "imported tree == base" "$base" "$R/current/"

step "diff --from-dir $base --to-dir $new (1 -> 2)"
t0=$(ts_now)
"$TREESWAP" -v diff --from-dir "$base" --to-dir "$new" --from-version 1 --to-version 2 \
    -o "$D" 2> "$W/diff.log" || { cat "$W/diff.log" >&2; die "treeswap diff failed"; }
echo "diff: $(ts_elapsed "$t0" "$(ts_now)") s"
sed 's/^/  log: /' "$W/diff.log"

# What the delta shipped, from its own manifest and tar listing, plus an independent
# check that `removed` + `changed` is exactly the set of paths that differ.
tar xOf "$D" delta.toml > "$W/delta.toml"
python3 - "$D" "$W/delta.toml" "$base" "$new" <<'PY'
import os, stat, sys, tarfile, tomllib, hashlib
from urllib.parse import unquote_to_bytes

delta, manifest, base, new = sys.argv[1:]
size = os.path.getsize(delta)
with open(manifest, "rb") as f:
    m = tomllib.load(f)
members = tarfile.open(delta).getmembers()
blob_bytes = sum(x.size for x in members if x.name.startswith("blobs/"))
print(f"delta: {size} bytes ({size / 1024:.0f} KiB) = delta.toml {os.path.getsize(manifest)} B"
      f" + {len(members) - 2} blobs {blob_bytes} B + tar headers/padding"
      f" {size - os.path.getsize(manifest) - blob_bytes} B")
print(f"  result: {m['to_count']} entries; {len(m['changed'])} changed,"
      f" {len(m['removed'])} removed, {len(m['contents'])} new contents")
by = {}
for c in m["contents"]:
    n, s, b = by.get(c["source"], (0, 0, 0))
    by[c["source"]] = (n + 1, s + c["size"], b + c.get("blob_size", 0))
for src, (n, s, b) in sorted(by.items()):
    print(f"  {src:10} {n:4} contents, {s:9} bytes of content shipped as {b:8} bytes")
paths = {}
for e in m["changed"]:
    if e["type"] == "file":
        paths.setdefault(e["sha256"], []).append(e["path"])
big = sorted((c for c in m["contents"] if c["source"] != "base"),
             key=lambda c: -c.get("blob_size", 0))[:8]
print("  largest blobs:")
for c in big:
    p = paths.get(c["sha256"], ["?"])
    more = f" (+{len(p) - 1} more)" if len(p) > 1 else ""
    print(f"    {c.get('blob_size', 0):8} B {c['source']:10} for {c['size']:8} B  {p[0]}{more}")

# Independent: walk both trees and list every path whose entry differs in anything the
# manifest records (type, mode, owner, size, content, target, device, xattrs).
def entry(p):
    st = os.lstat(p)
    x = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                     for n in os.listxattr(p, follow_symlinks=False)))
    r = (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, x)
    if stat.S_ISLNK(st.st_mode):
        return r + (os.readlink(p),)
    r += (stat.S_IMODE(st.st_mode),)
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        return r + (st.st_size, h.digest())
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return r + (st.st_rdev,)
    return r

def walk(top):
    top = os.fsencode(top)
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(d, n)
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                continue
            out[os.path.relpath(p, top)] = p
    return out

a, b = walk(base), walk(new)
want_removed = set(a) - set(b)
want_changed = {p for p in b if p not in a or entry(a[p]) != entry(b[p])}
got_removed = {unquote_to_bytes(p) for p in m["removed"]}
got_changed = {unquote_to_bytes(e["path"]) for e in m["changed"]}
bad = 0
for what, want, got in (("removed", want_removed, got_removed),
                        ("changed", want_changed, got_changed)):
    for p in sorted(want - got):
        print(f"  MISSING from delta {what}: {p!r}"); bad += 1
    for p in sorted(got - want):
        print(f"  EXTRA in delta {what} (entry is identical): {p!r}"); bad += 1
if bad:
    print(f"delta lists the wrong paths: {bad} discrepancies")
    sys.exit(1)
print(f"ok: delta lists exactly the {len(want_changed)} changed and {len(want_removed)} "
      f"removed paths an independent walk finds")
PY

step "apply (--no-restart)"
t0=$(ts_now)
ts -v apply "$D" --no-restart 2> "$W/apply.log" || { cat "$W/apply.log" >&2; die "apply failed"; }
echo "apply: $(ts_elapsed "$t0" "$(ts_now)") s"
sed 's/^/  log: /' "$W/apply.log"
[ "$(readlink "$R/current")" = trees/2 ] || die "current is $(readlink "$R/current"), not trees/2"
compare "current (2) == upgraded tree" "$new" "$R/current/"
ts verify --full || die "verify --full failed after apply"
echo "ok: verify --full of 2"

step "revert (--no-restart)"
ts revert --no-restart
[ "$(readlink "$R/current")" = trees/1 ] || die "current is $(readlink "$R/current"), not trees/1"
compare "current (1) == base tree" "$base" "$R/current/"
ts verify --full || die "verify --full failed after revert"
echo "ok: verify --full of 1"
compare "trees/2 still == upgraded tree" "$new" "$R/trees/2"

echo
ts status
echo
echo "PASS: real point-release update applied, checked, reverted, checked"
