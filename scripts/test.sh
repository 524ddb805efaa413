#!/usr/bin/env bash
# The test command: installs what the tests need (as root, on Debian) and runs the suite.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v setfattr >/dev/null || need+=(attr)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v minisign >/dev/null || need+=(minisign)
command -v chattr >/dev/null || need+=(e2fsprogs)
command -v zstd >/dev/null || need+=(zstd)
[ -x /usr/bin/time ] || need+=(time)
command -v fuse2fs >/dev/null || need+=(fuse2fs)
# tests/update.rs (issue 18): a release repository served by nginx, https with an openssl CA.
command -v nginx >/dev/null || need+=(nginx-light)
command -v openssl >/dev/null || need+=(openssl)
# Guests (issue 16): real nspawn containers, and nsenter to write inside them.
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v nsenter >/dev/null || need+=(util-linux)
command -v lxc-start >/dev/null || need+=(lxc)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cd "$repo"
# Doc tests are left out (--all-targets): there are none, and their empty run would be the
# last result line. The summary line adds up every suite.
# A test that cannot run here (not root, say) fails, unless TREESWAP_TEST_ALLOW_SKIP=1: then it
# returns early, which libtest counts as passed, and writes "SUITE::TEST<TAB>REASON" to
# TREESWAP_TEST_SKIP_LOG. Those tests are listed below and counted as skipped, not passed.
log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
export TREESWAP_TEST_SKIP_LOG="$skips"
set +e
cargo test --release --all-targets "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# A property test skips once per case: count each test once.
skipped=$(sort -u -t "$(printf '\t')" -k1,1 "$skips")
nskipped=$(printf '%s' "$skipped" | grep -c . || true)
if [ "$nskipped" -gt 0 ]; then
  echo "skipped (TREESWAP_TEST_ALLOW_SKIP=1), counted as skipped, not passed:"
  printf '%s\n' "$skipped" | sed 's/\t/: /; s/^/  /'
fi
awk -v s="$nskipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, g + s }' "$log"
exit "$rc"
