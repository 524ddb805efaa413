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
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cd "$repo"
# Doc tests are left out (--all-targets): there are none, and their empty run would be the
# last result line. The summary line adds up every suite.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --all-targets "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, g }' "$log"
exit "$rc"
