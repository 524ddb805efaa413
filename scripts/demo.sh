#!/usr/bin/env bash
# The main job on the bundled example: build treeswap, import fixtures/v1 into a fresh state
# root, make a delta to fixtures/v2, apply it (stage, verify, flip), show the status, verify,
# revert, and verify again. Usage: scripts/demo.sh   (as root, for owners and device nodes)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
echo "demo: building treeswap (cargo build --release; the first build takes a few minutes)" >&2
cargo build --release --manifest-path "$repo/Cargo.toml"
ts="$repo/target/release/treeswap"
work=$(mktemp -d)
# Objects may carry the immutable flag (protect = "immutable"); clear it to clean up.
trap 'chattr -R -f -i "$work" 2>/dev/null || true; rm -rf "$work"' EXIT

# Git keeps only the executable bit, so set the modes the example means.
cp -a "$repo/fixtures/v1" "$work/v1"
cp -a "$repo/fixtures/v2" "$work/v2"
for v in v1 v2; do
  find "$work/$v" -type d -exec chmod 755 {} +
  find "$work/$v" -type f ! -perm -u+x -exec chmod 644 {} +
done
chmod 600 "$work/v2/etc/hello.conf"          # a metadata-only change: no bytes shipped
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$work/v1/dev" "$work/v2/dev"
  mknod "$work/v1/dev/null" c 1 3 && mknod "$work/v2/dev/null" c 1 3
  mkfifo "$work/v2/dev/initctl"
fi

run() { echo "\$ treeswap $*"; "$ts" "$@"; }
export TREESWAP_ROOT="$work/versions"
run init
run import "$work/v1" --version 1 --activate
run verify --full
run diff --from-dir "$work/v1" --to-dir "$work/v2" --from-version 1 --to-version 2 -o "$work/2.delta" -v
echo "delta: $(stat -c %s "$work/2.delta") bytes, a zstd-compressed tar; members:"
zstd -dc "$work/2.delta" | tar tf - | sed 's/^/  /'
run apply "$work/2.delta" --no-restart -v
run status
"$work/versions/current/usr/bin/hello"
run verify --full
run revert --no-restart -v
"$work/versions/current/usr/bin/hello"
run verify --full
run status --json
echo "demo finished: import, diff, apply, revert all succeeded"
