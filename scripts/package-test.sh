#!/usr/bin/env bash
# package-test.sh - builds the Debian package and proves that it installs: into a fresh copy
# of the cached debootstrap bookworm minbase tree, with `dpkg -i`.
#
#   scripts/package-test.sh          (as root: chroot, mounts)
#
# TREESWAP_README: the README whose Install section is checked (default: the repository's).
#
# Checks, each printed:
#   - `treeswap --version` runs there and names Cargo.toml's version; `treeswap init` and
#     `status` work with the shipped /etc/treeswap.toml;
#   - `man -w treeswap` finds the page, and it and one command's page render without warnings;
#   - the bash completion completes a command's name;
#   - `dpkg -L treeswap` lists exactly what the README's "Install" section names (its table's
#     `/...` paths, `*` matching any characters), and every file in scripts/boot/ is in the
#     package; /etc/treeswap.toml and /etc/init.d/treeswap are conffiles;
#   - installing enabled nothing and started nothing: no new link in /etc/systemd/system or
#     /etc/rc?.d, no process left running in the chroot, and no maintainer script that enables,
#     starts or invokes a unit or an init script;
#   - `dpkg --purge` removes every file and the links an administrator's `systemctl enable` or
#     `update-rc.d` made, and leaves the state root alone.
#
# man-db is not in minbase: its packages are downloaded once (apt-get in a scratch copy of the
# tree, from the Debian mirror of the machine's apt sources; see lib.sh) into
# $TREESWAP_CACHE/bookworm-minbase-man-db-debs/ and installed with `dpkg -i` on every run.
# First run: cargo-deb's install (minutes), debootstrap if the tree is not cached, the man-db
# download; later runs: the release build (usually cached) and about 20 seconds.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || die "must run as root (chroot, mount)"

mounted=()
umount_all() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -l "${mounted[i]}" || log "warning: could not unmount ${mounted[i]}"
    done
    mounted=()
}
trap 'umount_all; ts_cleanup' EXIT

failures=0
pass() { log "ok: $*"; }
fail() { log "FAIL: $*"; failures=$((failures + 1)); }
# in_tree DIR CMD...: run CMD chrooted into DIR with a clean environment; in_root: in the
# test's chroot.
in_tree() {
    local dir=$1
    shift
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
        DEBIAN_FRONTEND=noninteractive HOME=/root "$@"
}
in_root() { in_tree "$root" "$@"; }

# --- the package ---------------------------------------------------------------------------
log "building the package (scripts/build-deb.sh)"
deb=$("$TS_SCRIPTS/build-deb.sh")
version=$(cargo metadata --format-version 1 --no-deps --manifest-path "$TS_REPO/Cargo.toml" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["packages"][0]["version"])')
log "package: $deb (treeswap $version)"

# --- a fresh chroot --------------------------------------------------------------------------
base=$(bookworm_tree)
ts_mktemp
root=$TS_TMP/chroot
log "copying $base to $root (cp -a)"
cp -a "$base" "$root"
mount -t proc proc "$root/proc"; mounted+=("$root/proc")
mount --bind /dev "$root/dev"; mounted+=("$root/dev")

debs=$TS_CACHE/bookworm-minbase-man-db-debs
# Downloads in a scratch copy of the tree, so that the test's chroot is the same on the first
# run as on every later one: the tree plus `dpkg -i` of the cached packages.
_fetch_man_db() {
    local mirror tmp scratch=$TS_TMP/scratch
    [ -d "$debs" ] && return 0
    mirror=$(ts_mirror)
    log "downloading man-db and what it needs (apt-get in a scratch copy of the tree, from $mirror)"
    cp -a "$base" "$scratch"
    echo "deb $mirror bookworm main" > "$scratch/etc/apt/sources.list"
    cp -L /etc/resolv.conf "$scratch/etc/resolv.conf"
    in_tree "$scratch" apt-get update -qq >&2
    in_tree "$scratch" apt-get install -y -qq --no-install-recommends --download-only man-db >&2
    tmp=$debs.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    cp "$scratch"/var/cache/apt/archives/*.deb "$tmp/"
    mv -T "$tmp" "$debs"
    rm -rf "$scratch"
}
_ts_locked _fetch_man_db
log "installing man-db into the chroot (dpkg -i $(find "$debs" -name '*.deb' | wc -l) packages from $debs)"
mkdir -p "$root/tmp/man-db"
cp "$debs"/*.deb "$root/tmp/man-db/"
in_root sh -c 'dpkg -i /tmp/man-db/*.deb' >/dev/null ||
    die "dpkg -i of the cached man-db packages failed; if the cached tree was rebuilt, remove $debs"
rm -rf "$root/tmp/man-db"

# --- install ---------------------------------------------------------------------------------
links() { find "$root/etc/systemd/system" "$root"/etc/rc?.d -mindepth 1 2>/dev/null | sort; }
links_before=$(links)
cp "$deb" "$root/tmp/"
log "dpkg -i /tmp/$(basename "$deb") (in the chroot)"
in_root dpkg -i "/tmp/$(basename "$deb")" >&2 || die "dpkg -i failed"

# --- checks ----------------------------------------------------------------------------------
log "checking"
out=$(in_root treeswap --version)
if [ "$out" = "treeswap $version" ]; then pass "treeswap --version: $out"; else fail "treeswap --version said '$out', not 'treeswap $version'"; fi
if in_root treeswap --root /srv/treeswap-test init && in_root treeswap --root /srv/treeswap-test status >/dev/null; then
    pass "treeswap init and status with the shipped /etc/treeswap.toml"
else
    fail "treeswap init or status failed with the shipped /etc/treeswap.toml"
fi

page=$(in_root man -w treeswap || true)
if [ "$page" = /usr/share/man/man8/treeswap.8.gz ]; then pass "man -w treeswap: $page"; else fail "man -w treeswap said '$page'"; fi
for p in treeswap treeswap-apply; do
    warnings=$(in_root env MANWIDTH=80 man --warnings -P cat "$p" 2>&1 >/dev/null || echo "man $p failed")
    if [ -z "$warnings" ]; then pass "man $p renders without warnings"; else fail "man $p: $warnings"; fi
done
# Bash calls the completion function with the command, the word and the word before it.
# shellcheck disable=SC2016  # expanded by the chroot's bash
words=$(in_root bash -c '. /usr/share/bash-completion/completions/treeswap
    COMP_WORDS=(treeswap ap); COMP_CWORD=1; COMP_LINE="treeswap ap"; COMP_POINT=${#COMP_LINE}
    "$(complete -p treeswap | sed -n "s/.*-F \([^ ]*\).*/\1/p")" treeswap ap treeswap
    echo "${COMPREPLY[*]}"' || true)
if [ "$words" = apply ]; then
    pass "the bash completion completes 'treeswap ap' to '$words'"
else
    fail "the bash completion completed 'treeswap ap' to '$words', not 'apply'"
fi

# What dpkg -L lists against the README's Install section.
listed=$(in_root dpkg -L treeswap)
files=$(while read -r f; do [ -d "$root$f" ] || echo "$f"; done <<<"$listed")
echo "$files" > "$TS_TMP/files"
readme_check=$(python3 - "${TREESWAP_README:-$TS_REPO/README.md}" "$TS_TMP/files" <<'PY'
import fnmatch, re, sys
text = open(sys.argv[1], encoding="utf-8").read()
m = re.search(r"^## Install\n(.*?)(?=^## |\Z)", text, re.S | re.M)
if not m:
    print("the README has no \"## Install\" section")
    sys.exit(0)
patterns = [p for line in m.group(1).splitlines() if line.startswith("|")
            for p in re.findall(r"`(/[^`]*)`", line)]
if not patterns:
    print("the README's Install section has no table of /paths")
files = open(sys.argv[2], encoding="utf-8").read().split()
for p in patterns:
    if not any(fnmatch.fnmatchcase(f, p) for f in files):
        print(f"the README names {p}, which the package does not hold")
for f in files:
    if not any(fnmatch.fnmatchcase(f, p) for p in patterns):
        print(f"the package holds {f}, which the README's Install section does not name")
PY
)
if [ -z "$readme_check" ]; then
    pass "dpkg -L treeswap lists what the README says ($(wc -l <<<"$files") files)"
else
    while read -r line; do fail "$line"; done <<<"$readme_check"
fi
for f in "$TS_REPO"/scripts/boot/*; do
    found=
    while read -r g; do
        if cmp -s "$f" "$root$g"; then found=$g; break; fi
    done <<<"$files"
    if [ -n "$found" ]; then pass "scripts/boot/$(basename "$f") is packaged as $found"; else fail "scripts/boot/$(basename "$f") is not in the package"; fi
done
# shellcheck disable=SC2016  # dpkg-query's own ${field} syntax
conffiles=$(in_root dpkg-query -W -f='${Conffiles}' treeswap | awk '{print $1}')
for c in /etc/treeswap.toml /etc/init.d/treeswap; do
    if grep -qxF "$c" <<<"$conffiles"; then pass "$c is a conffile"; else fail "$c is not a conffile"; fi
done

# Nothing enabled, nothing started.
new_links=$(comm -13 <(echo "$links_before") <(links))
if [ -z "$new_links" ]; then
    pass "dpkg -i made nothing in /etc/systemd/system or /etc/rc?.d (no unit or init script enabled)"
else
    fail "dpkg -i made: $(echo "$new_links" | sed "s|^$root||" | tr '\n' ' ')"
fi
running=$(for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && echo "${p#/proc/} $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)"
done || true)
if [ -z "$running" ]; then pass "no process runs in the chroot after dpkg -i"; else fail "running in the chroot: $running"; fi
ctrl=$TS_TMP/control
dpkg-deb -e "$deb" "$ctrl"
starts=$(grep -nE 'systemctl[^#]*[[:space:]](enable|start|restart|reload-or-restart|try-restart)|deb-systemd-(helper|invoke)|invoke-rc\.d|update-rc\.d|(^|[[:space:]])service[[:space:]]' \
    "$ctrl"/preinst "$ctrl"/postinst "$ctrl"/prerm "$ctrl"/postrm 2>/dev/null | grep -v ':[[:space:]]*#' || true)
if [ -z "$starts" ]; then
    pass "no maintainer script enables, starts or invokes anything ($(cd "$ctrl" && ls -m -- *inst *rm 2>/dev/null))"
else
    fail "maintainer scripts: $starts"
fi

# Purge: every file goes, a link an administrator's `systemctl enable` made goes, the state
# root stays.
mkdir -p "$root/etc/systemd/system/sysinit.target.wants"
ln -s /usr/lib/systemd/system/treeswap-boot.service "$root/etc/systemd/system/sysinit.target.wants/"
ln -s ../init.d/treeswap "$root/etc/rcS.d/S01treeswap"
log "dpkg --purge treeswap (in the chroot)"
in_root dpkg --purge treeswap >&2 || fail "dpkg --purge failed"
left=$(while read -r f; do [ -e "$root$f" ] && echo "$f"; done <<<"$files" || true)
if [ -z "$left" ]; then pass "dpkg --purge removed every file of the package"; else fail "left after purge: $(echo "$left" | tr '\n' ' ')"; fi
for l in systemd/system/sysinit.target.wants/treeswap-boot.service rcS.d/S01treeswap; do
    if [ ! -L "$root/etc/$l" ]; then
        pass "dpkg --purge removed the dangling link /etc/$l an administrator's enable made"
    else
        fail "dpkg --purge left /etc/$l"
    fi
done
if [ -d "$root/srv/treeswap-test/trees" ]; then pass "dpkg --purge left the state root alone"; else fail "dpkg --purge touched the state root"; fi

umount_all
if [ "$failures" -gt 0 ]; then
    log "package-test: FAILED, $failures check(s)"
    exit 1
fi
log "package-test: ok"
