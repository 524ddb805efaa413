#!/bin/bash
# test-compare-trees.sh - self-test of compare-trees.sh: builds a tree by hand with
# every kind of entry (odd names, devices, fifo, socket, xattrs, setuid, hardlinks),
# checks that a `cp -a` copy compares identical, then makes one change of each kind
# to a fresh copy and checks that compare-trees.sh reports it and exits 1.
#
# Usage: test-compare-trees.sh        (as root: makes device nodes and chowns)
# SC2015: ok/bad always return 0; SC2016: the sh -c bodies expand their own $1.
# shellcheck disable=SC2015,SC2016
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap ts_cleanup EXIT
ensure_pkgs attr python3

CMP="$TS_SCRIPTS/compare-trees.sh"
ts_mktemp
W=$TS_TMP
A="$W/a"
NL=$'new\nline'
BAD=$'bad\xff\xfename'

mkdir -p "$A/usr/bin" "$A/etc" "$A/dev" "$A/tmp" "$A/d/$NL" "$A/empty"
echo hello > "$A/etc/hello"
: > "$A/etc/empty"
printf 'x%.0s' {1..5000} > "$A/usr/bin/tool"
chmod 4755 "$A/usr/bin/tool"
cp "$A/etc/hello" "$A/usr/bin/sg"
chmod 2711 "$A/usr/bin/sg"
chmod 1777 "$A/tmp"
echo newline > "$A/d/$NL/file$NL"
echo bad > "$A/$BAD"
ln -s ../etc/hello "$A/usr/bin/link"
ln -s "$BAD" "$A/badlink"
ln "$A/etc/hello" "$A/usr/bin/hello-hard"
ln "$A/etc/hello" "$A/d/hello-hard2"
mknod "$A/dev/null" c 1 3
mknod "$A/dev/loop9" b 7 9
mkfifo "$A/dev/fifo"
python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])' "$A/sock"
chown 1000:1001 "$A/etc/hello"
chown -h 7:8 "$A/usr/bin/link"
setfattr -n user.test -v 0x00ff01 "$A/etc/empty"
setfattr -n user.other -v "text value" "$A/d"
setfattr -n trusted.t -v 1 "$A/$BAD"

pass=0 fail=0
ok()  { pass=$((pass + 1)); printf 'ok   %s\n' "$1"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$1"; }

# expect_diff NAME PATTERN MUTATION...: copy A, run the mutation in the copy
# (cwd = copy), expect exit 1 and PATTERN in the output.
expect_diff() {
    local name=$1 pattern=$2 b rc out
    shift 2
    b="$W/b-$pass-$fail"
    cp -a "$A" "$b"
    (cd "$b" && "$@")
    set +e
    out=$("$CMP" "$A" "$b" 2>&1)
    rc=$?
    set -e
    if [ "$rc" -eq 1 ] && grep -qF -- "$pattern" <<<"$out"; then
        ok "$name"
    else
        bad "$name (rc=$rc, wanted '$pattern'):"
        printf '%s\n' "$out" | sed 's/^/     /'
    fi
    rm -rf "$b"
}

# Identical copy, and the socket is ignored even when only one side has it.
cp -a "$A" "$W/same"
rm "$W/same/sock"
out=$("$CMP" "$A" "$W/same") && grep -q '^trees identical: ' <<<"$out" \
    && ok "cp -a copy is identical ($out)" || bad "cp -a copy: $out"
out=$("$CMP" "$W/same" "$W/same") || true
grep -q '^trees identical' <<<"$out" && ok "tree vs itself" || bad "tree vs itself: $out"

# Extra hardlinks in B are allowed (treeswap joins identical files).
mkdir "$W/j2"; cp -a "$A/etc/empty" "$W/j2/e1"; cp -a "$A/etc/empty" "$W/j2/e2"
cp -a "$W/j2" "$W/j3"; rm "$W/j3/e2"; ln "$W/j3/e1" "$W/j3/e2"
out=$("$CMP" "$W/j2" "$W/j3") && ok "joined identical files accepted ($out)" \
    || bad "joined identical files: $out"

expect_diff "content"          "etc/hello: sha256"            sh -c 'echo HELLO > etc/hello'
expect_diff "size"             "usr/bin/tool: size 5000"      sh -c 'echo >> usr/bin/tool'
expect_diff "setuid bit"       "usr/bin/tool: perm 0o4755 != 0o755" chmod u-s usr/bin/tool
expect_diff "setgid bit"       "usr/bin/sg: perm 0o2711"      chmod g-s usr/bin/sg
expect_diff "sticky bit"       "tmp: perm 0o1777 != 0o777"    chmod -t tmp
expect_diff "top dir mode"     ".: perm"                      chmod 700 .
expect_diff "uid"              "etc/hello: uid 1000 != 1"     chown 1 etc/hello
expect_diff "gid"              "etc/hello: gid 1001 != 2"     chgrp 2 etc/hello
expect_diff "symlink owner"    "usr/bin/link: uid 7 != 0"     chown -h 0 usr/bin/link
expect_diff "symlink target"   "usr/bin/link: target ../etc/hello != /etc/hello" \
    ln -sfn /etc/hello usr/bin/link
expect_diff "non-UTF-8 target" "badlink: target bad\\xff\\xfename != bad" ln -sfn bad badlink
expect_diff "device minor"     "dev/null: rdev [1, 3] != [1, 5]" \
    sh -c 'rm dev/null && mknod dev/null c 1 5'
expect_diff "device major"     "dev/loop9: rdev [7, 9] != [8, 9]" \
    sh -c 'rm dev/loop9 && mknod dev/loop9 b 8 9'
expect_diff "char vs block"    "dev/null: type chardev != blockdev" \
    sh -c 'rm dev/null && mknod dev/null b 1 3'
expect_diff "fifo -> file"     "dev/fifo: type fifo != file"  sh -c 'rm dev/fifo && : > dev/fifo'
expect_diff "xattr value"      "etc/empty: xattr user.test 0x00ff01 != 0x00ff02" \
    setfattr -n user.test -v 0x00ff02 etc/empty
expect_diff "xattr removed"    "d: xattr user.other only in A" setfattr -x user.other d
expect_diff "xattr added"      "etc/hello: xattr user.new only in B" setfattr -n user.new -v 1 etc/hello
expect_diff "trusted xattr"    "xattr trusted.t 0x31 != 0x32" setfattr -n trusted.t -v 2 "$BAD"
expect_diff "hardlink split"   "hardlink group split in B"    \
    sh -c 'cp etc/hello x && mv x usr/bin/hello-hard && chown 1000:1001 usr/bin/hello-hard'
expect_diff "removed file"     "only in A (file)"             rm "$BAD"
expect_diff "added file"       "only in B (file)"             sh -c 'echo > new'
expect_diff "empty dir removed" "empty: only in A (dir)"      rmdir empty
expect_diff "newline name"     "d/new\\nline/filenew\\nline: sha256" \
    sh -c 'echo changed > "d/$1/file$1"' _ "$NL"
expect_diff "newline dir mode" "d/new\\nline: perm"           chmod 700 "d/$NL"
expect_diff "non-UTF-8 name"   "bad\\xff\\xfename: sha256"    sh -c 'echo changed > "$1"' _ "$BAD"
expect_diff "file -> symlink"  "etc/empty: type file != symlink" \
    sh -c 'rm etc/empty && ln -s hello etc/empty'

# --mtime and snapshots: a snapshot compares equal to its tree until something changes.
"$CMP" --save "$W/snap.json" "$A" > /dev/null
out=$("$CMP" --mtime "$W/snap.json" "$A") && ok "snapshot vs tree ($out)" || bad "snapshot: $out"
cp -a "$A" "$W/m"
touch -d '2001-01-01' "$W/m/etc/hello"
"$CMP" "$A" "$W/m" > /dev/null && ok "mtime ignored by default" || bad "mtime not ignored"
out=$("$CMP" --mtime "$A" "$W/m") && rc=0 || rc=$?
[ "$rc" = 1 ] && grep -q 'etc/hello: mtime' <<<"$out" && ok "--mtime detects mtime" \
    || bad "--mtime: rc=$rc $out"
cp -a "$A" "$W/f"
chattr +i "$W/f/etc/hello"
"$CMP" "$A" "$W/f" > /dev/null && ok "inode flags ignored by default" || bad "flags not ignored"
out=$("$CMP" --flags "$A" "$W/f") && rc=0 || rc=$?
[ "$rc" = 1 ] && grep -q 'etc/hello: flags - != i' <<<"$out" && ok "--flags detects chattr +i" \
    || bad "--flags: rc=$rc $out"
chattr -i "$W/f/etc/hello"
"$CMP" "$A" "$W/does-not-exist" > /dev/null 2>&1 && rc=0 || rc=$?
[ "$rc" = 2 ] && ok "missing tree exits 2" || bad "missing tree exits $rc"

echo
echo "compare-trees self-test: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
