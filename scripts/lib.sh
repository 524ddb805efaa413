# shellcheck shell=bash
# lib.sh - shared helpers for treeswap's test and benchmark scripts.
#
# Usage (from another script in scripts/):
#   source "$(dirname "$0")/lib.sh"
#   trap ts_cleanup EXIT
#
# Functions:
#   ensure_pkgs PKG...       apt-get install whatever of PKG... is missing
#                            (one apt-get update per process, only if needed)
#   bookworm_tree            echo the path of a cached `debootstrap --variant=minbase
#                            bookworm` tree, building it on first use
#   bookworm_upgraded_tree   echo the path of a cached copy of that tree after a real
#                            `apt-get upgrade` with bookworm-updates and bookworm-security
#   bookworm_packages_tree   echo the path of a cached copy of that tree with TS_PACKAGES
#                            installed (no recommends) from the point release
#   bookworm_packages_upgraded_tree
#                            echo the path of a cached copy of the packages tree after a
#                            real `apt-get upgrade` with bookworm-updates and
#                            bookworm-security (the kiosk's point-release update)
#   trixie_tree              echo the path of a cached `debootstrap --variant=minbase
#                            trixie` tree
#   gen_tree_cached N SEED   echo the path of a cached `gen-tree.py --entries N --seed SEED`
#                            tree, generating it on first use
#   build_treeswap           cargo build --release; sets TREESWAP to the binary
#                            (if TREESWAP is already set to an executable, uses that)
#   ts_mktemp                make a temp dir that ts_cleanup removes; sets TS_TMP
#   ts_cleanup               remove every temp dir made by ts_mktemp
#   drop_caches              sync and drop the page, dentry and inode caches
#   ts_now                   print the wall clock in seconds (float)
#   ts_elapsed T0 T1         print T1 - T0 with 2 decimals
#   ts_loadavg               print the load averages (shown next to benchmark figures)
#   log MSG...               print MSG to stderr with a prefix
#   die MSG...               log and exit 1
#
# Environment:
#   TREESWAP_CACHE            cache dir (default /var/cache/treeswap-test)
#   TREESWAP_MIRROR           Debian mirror (default: the first URI ending in /debian in
#                             the machine's apt sources; an error if there is none)
#   TREESWAP_SECURITY_MIRROR  security mirror (default: the first URI ending in
#                             /debian-security there; an error if there is none)
#   TREESWAP                  path of a treeswap binary to use instead of building one

# Make `x=$(f)` fail when f fails part-way, as the callers run with set -e.
shopt -s inherit_errexit

TS_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export TS_SCRIPTS="$TS_REPO/scripts"
TS_CACHE="${TREESWAP_CACHE:-/var/cache/treeswap-test}"
# Root's cargo lives in ~/.cargo/bin, which a non-login shell may not have on PATH.
case ":$PATH:" in
    *":$HOME/.cargo/bin:"*) ;;
    *) PATH="$PATH:$HOME/.cargo/bin" ;;
esac
export PATH

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

ts_now() { date +%s.%N; }
# ts_loadavg: the 1/5/15-minute load averages, to show with benchmark figures
# (another build running on the machine skews them).
ts_loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# ts_elapsed T0 T1: seconds between two ts_now readings, 2 decimals.
ts_elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# Turn INT and TERM into a normal exit, so the caller's EXIT trap (ts_cleanup)
# runs on Ctrl-C or kill too.
trap 'exit 130' INT
trap 'exit 143' TERM

# Temp dirs are registered here so one trap in the calling script removes them all.
TS_TMPDIRS=()
ts_mktemp() {
    TS_TMP=$(mktemp -d "${TMPDIR:-/tmp}/treeswap.XXXXXX")
    TS_TMPDIRS+=("$TS_TMP")
}
ts_cleanup() {
    local d
    for d in "${TS_TMPDIRS[@]}"; do
        # Never recurse into something mounted below a temp dir (a chroot's /dev, say).
        if findmnt -rn -o TARGET | grep -qF -- "$d/"; then
            log "warning: not removing $d: something is mounted below it"
            continue
        fi
        _ts_rm_tree "$d"
    done
    TS_TMPDIRS=()
}

# treeswap marks pool objects immutable (chattr +i) where the file system allows,
# so a plain rm -rf of a state root fails; clear the flags and try again.
_ts_rm_tree() {
    rm -rf --one-file-system -- "$1" 2>/dev/null && return 0
    chattr -R -f -i -a "$1" 2>/dev/null || true
    rm -rf --one-file-system -- "$1"
}

drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
}

_TS_APT_UPDATED=
ensure_pkgs() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$_TS_APT_UPDATED" ]; then
        log "apt-get update (to install: ${missing[*]})"
        apt-get update -qq >&2
        _TS_APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
}

# The first URI in the machine's apt sources (deb822 *.sources, then one-line
# sources.list and *.list) whose path ends in $1 ("/debian" or "/debian-security"),
# so the scripts use the mirror this machine is known to reach.
_ts_mirror_from_sources() {
    local suffix=$1 f uri
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        while read -r uri; do
            case "$uri" in
                *"$suffix" | *"$suffix/") printf '%s\n' "${uri%/}"; return 0 ;;
            esac
        done < <(case "$f" in
                     *.sources) sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n' ;;
                     *) sed -n 's/^[[:space:]]*deb\(-src\)\?[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\3/p' "$f" ;;
                 esac)
    done
    return 1
}
ts_mirror() {
    if [ -n "${TREESWAP_MIRROR:-}" ]; then echo "$TREESWAP_MIRROR"; return; fi
    _ts_mirror_from_sources /debian \
        || die "no Debian mirror (a URI ending in /debian) in the apt sources; set TREESWAP_MIRROR"
}
ts_security_mirror() {
    if [ -n "${TREESWAP_SECURITY_MIRROR:-}" ]; then echo "$TREESWAP_SECURITY_MIRROR"; return; fi
    _ts_mirror_from_sources /debian-security \
        || die "no Debian security mirror (a URI ending in /debian-security) in the apt sources; set TREESWAP_SECURITY_MIRROR"
}

# Remove leftovers of an interrupted build (NAME.tmp.*), refusing if anything is
# still mounted below them.
_ts_remove_stale() {
    local d
    for d in "$TS_CACHE/$1".tmp.*; do
        [ -e "$d" ] || continue
        if findmnt -rn -o TARGET | grep -qF -- "$d/"; then
            die "stale $d still has mounts below it; unmount them and remove it by hand"
        fi
        log "removing stale partial build $d"
        _ts_rm_tree "$d"
    done
}

# Run with the cache lock held so two scripts never build the same tree at once.
_ts_locked() {
    mkdir -p "$TS_CACHE"
    (
        flock 9
        "$@"
    ) 9>"$TS_CACHE/.lock"
}

# Downloaded .debs, the package lists and lock files are what an image builder removes
# after an apt run; both cached trees drop them. apt's binary caches
# (var/cache/apt/pkgcache.bin, srcpkgcache.bin) stay: an image builder leaves them, so a
# benchmark runs on the trees as users have them (issue 17; they were deleted before,
# which hid 31 MB of a point release's delta).
_ts_clean_apt() {
    local root=$1
    find "$root/var/lib/apt/lists" -mindepth 1 -maxdepth 1 ! -name partial -exec rm -rf -- {} +
    find "$root/var/cache/apt" -maxdepth 2 -type f \( -name '*.deb' -o -name lock \) -delete
}

# _ts_build_minbase SUITE: $TS_CACHE/SUITE-minbase, `debootstrap --variant=minbase SUITE`.
_ts_build_minbase() {
    local suite=$1 final tmp mirror
    final="$TS_CACHE/$suite-minbase"
    [ -d "$final" ] && return 0
    _ts_remove_stale "$suite-minbase"
    ensure_pkgs debootstrap
    mirror=$(ts_mirror)
    tmp="$TS_CACHE/$suite-minbase.tmp.$$"
    log "debootstrap --variant=minbase $suite $tmp $mirror (a few minutes)"
    debootstrap --variant=minbase "$suite" "$tmp" "$mirror" >&2 \
        || die "debootstrap failed; partial tree left in $tmp (removed on next run)"
    _ts_clean_apt "$tmp"
    mv -T "$tmp" "$final"
    log "cached $final"
}

bookworm_tree() {
    _ts_locked _ts_build_minbase bookworm
    echo "$TS_CACHE/bookworm-minbase"
}

# trixie_tree: a cached `debootstrap --variant=minbase trixie` tree (Debian 13): with
# bookworm_tree, the pair of a release upgrade.
trixie_tree() {
    _ts_locked _ts_build_minbase trixie
    echo "$TS_CACHE/trixie-minbase"
}

# _ts_build_apt BASE NAME EXTRA-SUITES SCRIPT: $TS_CACHE/NAME, a copy of the cached tree
# $TS_CACHE/BASE (bookworm-minbase, or a tree made from it by _ts_build_apt) after SCRIPT
# (sh, in a chroot, with the point release's sources plus, when EXTRA-SUITES is "updates",
# bookworm-updates and bookworm-security). The package versions go to
# $TS_CACHE/NAME.versions (and BASE's to $TS_CACHE/BASE.versions); a SCRIPT that changed
# no package is an error.
# Runs in a subshell (note the parentheses) so its EXIT trap can unmount the
# chroot's file systems whatever happens, without touching the caller's traps.
_ts_build_apt() (
    set -euo pipefail
    local basename=$1 name=$2 extra=$3 script=$4
    local base="$TS_CACHE/$basename" final="$TS_CACHE/$name"
    local tmp mirror secmirror
    [ -d "$final" ] && exit 0
    _ts_remove_stale "$name"
    tmp="$TS_CACHE/$name.tmp.$$"
    mounted=()
    umount_all() {
        local i
        for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
            umount -l "${mounted[i]}" || log "warning: could not unmount ${mounted[i]}"
        done
        mounted=()
    }
    trap umount_all EXIT
    log "copying $base to $tmp"
    cp -a "$base" "$tmp"
    mount -t proc proc "$tmp/proc"; mounted+=("$tmp/proc")
    mount -t sysfs sysfs "$tmp/sys"; mounted+=("$tmp/sys")
    mount --bind /dev "$tmp/dev"; mounted+=("$tmp/dev")
    mount --bind /dev/pts "$tmp/dev/pts"; mounted+=("$tmp/dev/pts")
    # The extra suites go in their own file, removed afterwards, so the two trees
    # differ only by what SCRIPT did.
    if [ "$extra" = updates ]; then
        mirror=$(ts_mirror)
        secmirror=$(ts_security_mirror)
        cat > "$tmp/etc/apt/sources.list.d/treeswap-upgrade.list" <<EOF
deb $mirror bookworm-updates main
deb $secmirror bookworm-security main
EOF
    fi
    # No daemons may start inside the chroot.
    printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    log "in chroot $tmp: $script"
    chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C sh -c "$script" >&2
    # shellcheck disable=SC2016  # dpkg-query's own ${field} syntax
    chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        dpkg-query -W -f='${Package} ${Version}\n' > "$TS_CACHE/$name.versions"
    umount_all
    rm -f "$tmp/usr/sbin/policy-rc.d" "$tmp/etc/apt/sources.list.d/treeswap-upgrade.list"
    _ts_clean_apt "$tmp"
    # A script that changed nothing is useless as a test of a real update.
    # shellcheck disable=SC2016  # dpkg-query's own ${field} syntax
    chroot "$base" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        dpkg-query -W -f='${Package} ${Version}\n' > "$TS_CACHE/$basename.versions"
    if cmp -s "$TS_CACHE/$basename.versions" "$TS_CACHE/$name.versions"; then
        die "\`$script\` changed no package; left $tmp for inspection"
    fi
    log "packages changed or added:"
    diff "$TS_CACHE/$basename.versions" "$TS_CACHE/$name.versions" \
        | sed -n 's/^> /  /p' >&2 || true
    mv -T "$tmp" "$final"
    log "cached $final"
)

# The upgraded tree's cache name. `bookworm-upgraded` (without a suffix) was made by an
# older lib.sh that deleted apt's binary caches: never reused. (The base never had them:
# debootstrap does not run apt.)
_TS_UPGRADED=bookworm-upgraded-apt-caches
_TS_UPGRADE_SCRIPT='apt-get update && apt-get -y upgrade && apt list --upgradable 2>/dev/null'
bookworm_upgraded_tree() {
    _ts_locked _ts_build_apt bookworm-minbase "$_TS_UPGRADED" updates "$_TS_UPGRADE_SCRIPT"
    echo "$TS_CACHE/$_TS_UPGRADED"
}

# The packages of the second real pair (issue 17): what a kiosk image might add to minbase.
TS_PACKAGES="python3 curl ca-certificates openssh-client less"
# bookworm_packages_tree: the minbase tree plus TS_PACKAGES (and what they depend on, no
# recommends), from the point release's own sources: the "new software" pair.
_ts_packages_name() { echo "bookworm-plus-$(tr ' ' '-' <<<"$TS_PACKAGES")"; }
bookworm_packages_tree() {
    local name
    name=$(_ts_packages_name)
    bookworm_tree > /dev/null
    _ts_locked _ts_build_apt bookworm-minbase "$name" none \
        "apt-get update && apt-get -y install --no-install-recommends $TS_PACKAGES"
    echo "$TS_CACHE/$name"
}

# bookworm_packages_upgraded_tree: the packages tree after the same real `apt-get upgrade`
# as bookworm_upgraded_tree (bookworm-updates and bookworm-security added): the
# point-release update that a kiosk built from the packages image receives (issue 17's
# second pair, `kiosk-point` in bench-delta.sh).
bookworm_packages_upgraded_tree() {
    local base name
    base=$(_ts_packages_name)
    name="$base-upgraded"
    bookworm_packages_tree > /dev/null
    _ts_locked _ts_build_apt "$base" "$name" updates "$_TS_UPGRADE_SCRIPT"
    echo "$TS_CACHE/$name"
}

_ts_build_gen_tree() {
    local n=$1 seed=$2 name=$3 tmp
    [ -d "$TS_CACHE/$name" ] && return 0
    _ts_remove_stale "$name"
    tmp="$TS_CACHE/$name.tmp.$$"
    log "generating $n entries (seed $seed) in $tmp"
    python3 "$TS_SCRIPTS/gen-tree.py" --entries "$n" --seed "$seed" "$tmp" >&2
    mv -T "$tmp" "$TS_CACHE/$name"
}

# gen_tree_cached N SEED: echo the path of a cached gen-tree.py tree of N entries.
# The name holds a hash of gen-tree.py, so a changed generator never reuses a tree
# made by an older one.
gen_tree_cached() {
    local gen name
    gen=$(sha256sum "$TS_SCRIPTS/gen-tree.py" | cut -c1-12)
    name="gentree-$gen-n$1-s$2"
    _ts_locked _ts_build_gen_tree "$1" "$2" "$name"
    echo "$TS_CACHE/$name"
}

build_treeswap() {
    if [ -n "${TREESWAP:-}" ] && [ -x "$TREESWAP" ]; then
        log "using TREESWAP=$TREESWAP (not building)"
        return 0
    fi
    command -v cargo > /dev/null || die "cargo not found (looked in PATH and ~/.cargo/bin)"
    log "cargo build --release"
    cargo build --release --quiet --manifest-path "$TS_REPO/Cargo.toml" >&2
    TREESWAP="$TS_REPO/target/release/treeswap"
    [ -x "$TREESWAP" ] || die "cargo build succeeded but $TREESWAP is missing"
    export TREESWAP
}

# --- benchmark helpers (appended for bench-apply.sh / bench-delta.sh) ---

# ts_copy_without_specials SRC DEST: cp -a SRC to DEST (which must not exist), then
# delete device nodes, FIFOs and sockets (OSTree refuses them); prints how many.
ts_copy_without_specials() {
    [ ! -e "$2" ] || die "ts_copy_without_specials: $2 exists"
    cp -a -- "$1" "$2"
    find "$2" \( -type c -o -type b -o -type p -o -type s \) -print -delete | wc -l
}
# ts_median "X Y Z ...": the median (the lower middle one of an even count).
ts_median() {
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
# ts_ratio A B: A / B with 2 decimals ("inf" if B is 0).
ts_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
# ts_verdict RATIO GOAL [lt]: PASS if RATIO <= GOAL (RATIO < GOAL with "lt"), else FAIL.
ts_verdict() {
    awk -v r="$1" -v g="$2" -v op="${3:-le}" 'BEGIN {
        ok = (r != "inf") && (op == "lt" ? r + 0 < g + 0 : r + 0 <= g + 0)
        print ok ? "PASS" : "FAIL" }'
}
# ts_spread "X Y Z ...": the samples' relative spread, (max - min) / median, 2 decimals
# (0.00 for one sample).
ts_spread() {
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {
        m = a[int((NR+1)/2)]; if (NR < 2 || m <= 0) { print "0.00"; exit }
        printf "%.2f", (a[NR] - a[1]) / m }'
}
# ts_judge VALUE GOAL: PASS if VALUE <= GOAL, else FAIL: for exact figures (sizes, memory).
ts_judge() {
    awk -v r="$1" -v g="$2" 'BEGIN { print (r != "inf" && r + 0 <= g + 0) ? "PASS" : "FAIL" }'
}
# ts_judge_times "A-SAMPLES" "B-SAMPLES" GOAL: judges the time ratio A/B (medians) against
# GOAL with the samples' noise: PASS if even the worst ratio the samples allow (slowest A
# over fastest B) meets GOAL, FAIL if even the best one (fastest A over slowest B) misses
# it, MARGINAL otherwise. The range is at least 10% either side of the median ratio, as one
# sample says nothing of the noise of a shared machine. Prints "VERDICT (best-worst)".
ts_judge_times() {
    local a b
    a=$(tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | tr '\n' ' ')
    b=$(tr ' ' '\n' <<<"$2" | sed '/^$/d' | sort -g | tr '\n' ' ')
    awk -v a="$a" -v b="$b" -v g="$3" 'BEGIN {
        na = split(a, x, " "); nb = split(b, y, " ")
        if (na == 0 || nb == 0 || y[1] <= 0) { print "FAIL (no samples)"; exit }
        r = x[int((na+1)/2)] / y[int((nb+1)/2)]
        worst = x[na] / y[1]; best = x[1] / y[nb]
        if (worst < r * 1.1) worst = r * 1.1
        if (best > r * 0.9) best = r * 0.9
        v = worst <= g ? "PASS" : (best > g ? "FAIL" : "MARGINAL")
        printf "%s (range %.2f-%.2f)", v, best, worst }'
}
