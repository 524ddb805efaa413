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
#   - the guest hooks, the update's cron line (an example: inert), the initramfs-tools hook
#     and local-bottom script, treeswap-root.sh and the dracut module are installed byte for
#     byte with their modes; each passes `sh -n` (`bash -n`) where it is; each guest hook
#     finds common.sh beside it, nspawn's `start` says that systemd-nspawn is missing, the
#     initramfs hook answers `prereqs`, dracut's `check` declines (255: only when asked for),
#     and local-bottom, with a /proc/cmdline of its own, does nothing without treeswap.root=
#     or treeswap.path= and, with a treeswap.root= of no device, says so and mounts nothing;
#   - the control archive's triggers activate update-initramfs (the hook reaches the image);
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

# The other shipped scripts: each where the README says, byte for byte, with its mode.
shipped=(
    "scripts/boot/treeswap-update.cron /usr/share/doc/treeswap/examples/treeswap-update.cron 644"
    "scripts/guests/chroot-service /usr/share/treeswap/guests/chroot-service 755"
    "scripts/guests/lxc /usr/share/treeswap/guests/lxc 755"
    "scripts/guests/nspawn /usr/share/treeswap/guests/nspawn 755"
    "scripts/guests/podman /usr/share/treeswap/guests/podman 755"
    "scripts/guests/common.sh /usr/share/treeswap/guests/common.sh 644"
    "scripts/initramfs-tools/treeswap-root.sh /usr/share/treeswap/treeswap-root.sh 644"
    "scripts/initramfs-tools/hooks/treeswap /usr/share/initramfs-tools/hooks/treeswap 755"
    "scripts/initramfs-tools/scripts/local-bottom/treeswap /usr/share/initramfs-tools/scripts/local-bottom/treeswap 755"
    "scripts/dracut/90treeswap/module-setup.sh /usr/lib/dracut/modules.d/90treeswap/module-setup.sh 755"
    "scripts/dracut/90treeswap/treeswap-mount.sh /usr/lib/dracut/modules.d/90treeswap/treeswap-mount.sh 755"
    "scripts/dracut/90treeswap/treeswap-root.sh /usr/share/treeswap/treeswap-root.sh 644"
)
for s in "${shipped[@]}"; do
    read -r src dst mode <<<"$s"
    got=$(stat -c '%a %F' "$root$dst" 2>/dev/null || echo missing)
    if [ "$got" != "$mode regular file" ]; then
        fail "$dst: $got, not a regular file of mode $mode"
    elif ! cmp -s "$TS_REPO/$src" "$root$dst"; then
        fail "$dst differs from $src"
    else
        pass "$src is $dst ($mode)"
    fi
done
# Each runs from where it is: the syntax of each, as its shell reads it.
for f in /usr/share/treeswap/guests/{chroot-service,lxc,nspawn,podman,common.sh} \
    /usr/share/treeswap/treeswap-root.sh /usr/share/initramfs-tools/hooks/treeswap \
    /usr/share/initramfs-tools/scripts/local-bottom/treeswap \
    /usr/lib/dracut/modules.d/90treeswap/treeswap-mount.sh; do
    if err=$(in_root sh -n "$f" 2>&1); then pass "sh -n $f"; else fail "sh -n $f: $err"; fi
done
f=/usr/lib/dracut/modules.d/90treeswap/module-setup.sh
if err=$(in_root bash -n "$f" 2>&1); then pass "bash -n $f"; else fail "bash -n $f: $err"; fi
# The hooks find common.sh beside them (its `die` says so), and run without a container.
for h in chroot-service lxc nspawn podman; do
    err=$(in_root "/usr/share/treeswap/guests/$h" stop 2>&1 >/dev/null) && rc=0 || rc=$?
    if [ "$rc" = 1 ] && [ "$err" = "/usr/share/treeswap/guests/$h: TREESWAP_GUEST is not set: run me as a treeswap guest hook" ]; then
        pass "guests/$h, run as a command, sources common.sh and refuses to run outside treeswap"
    else
        fail "guests/$h without TREESWAP_GUEST: exit $rc: $err"
    fi
done
err=$(in_root TREESWAP_GUEST=probe /usr/share/treeswap/guests/nspawn start -- /bin/true 2>&1 >/dev/null) && rc=0 || rc=$?
if [ "$rc" = 1 ] && [[ "$err" == *"systemd-nspawn is not installed (Debian: systemd-container)" ]]; then
    pass "guests/nspawn start says that systemd-nspawn is missing (minbase has none)"
else
    fail "guests/nspawn start without systemd-nspawn: exit $rc: $err"
fi
if err=$(in_root TREESWAP_GUEST=probe TREESWAP_GUEST_RUNDIR=/tmp/guests /usr/share/treeswap/guests/chroot-service stop 2>&1); then
    pass "guests/chroot-service stop of a guest that does not run succeeds"
else
    fail "guests/chroot-service stop: $err"
fi
out=$(in_root /usr/share/initramfs-tools/hooks/treeswap prereqs 2>&1) && rc=0 || rc=$?
if [ "$rc" = 0 ] && [ -z "$out" ]; then pass "initramfs-tools hooks/treeswap prereqs"; else fail "hooks/treeswap prereqs: exit $rc: $out"; fi
# shellcheck disable=SC2016  # expanded by the chroot's bash
out=$(in_root bash -c '. /usr/lib/dracut/modules.d/90treeswap/module-setup.sh; check; echo $?' 2>&1)
if [ "$out" = 255 ]; then
    pass "dracut's 90treeswap is included only when asked for (check returns 255)"
else
    fail "dracut 90treeswap check said: $out"
fi
# local_bottom CMDLINE: runs the installed local-bottom script as the initramfs would (rootmnt
# set), in a mount namespace of its own where /proc/cmdline reads CMDLINE; prints its output
# and, if it changed the mounts, a line saying so.
local_bottom() {
    printf '%s\n' "$1" >"$TS_TMP/cmdline"
    unshare -m --propagation private sh -c '
        mount --bind "$1" "$2/proc/cmdline" || exit 99
        before=$(cat /proc/self/mountinfo)
        chroot "$2" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TS_KMSG=/dev/null \
            rootmnt=/mnt sh /usr/share/initramfs-tools/scripts/local-bottom/treeswap 2>&1
        rc=$?
        [ "$(cat /proc/self/mountinfo)" = "$before" ] || echo "(the mounts changed)"
        exit $rc' sh "$TS_TMP/cmdline" "$root"
}
out=$(local_bottom "root=/dev/vda1 ro quiet") && rc=0 || rc=$?
if [ "$rc" = 0 ] && [ -z "$out" ] && [ ! -e "$root/run/treeswap" ]; then
    pass "local-bottom/treeswap does nothing without treeswap.root= or treeswap.path= on the command line"
else
    fail "local-bottom/treeswap without treeswap.root=: exit $rc: $out"
fi
out=$(local_bottom "root=/dev/vda1 treeswap.root=/dev/treeswap-package-test") && rc=0 || rc=$?
if [ "$rc" = 0 ] && [[ "$out" == *"treeswap.root=/dev/treeswap-package-test: no such block device"* ]] &&
    [[ "$out" != *"mounts changed"* ]]; then
    pass "local-bottom/treeswap reads treeswap.root= (a missing device: an error line, nothing mounted)"
else
    fail "local-bottom/treeswap with treeswap.root= of no device: exit $rc: $out"
fi
rm -rf "$root/run/treeswap" "$root/tmp/guests"

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
if grep -qx 'activate-noawait update-initramfs' "$ctrl/triggers" 2>/dev/null; then
    pass "the package activates update-initramfs (its initramfs hook reaches the next image)"
else
    fail "no 'activate-noawait update-initramfs' in the control archive's triggers"
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
