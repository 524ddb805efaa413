#!/usr/bin/env bash
# build-deb.sh - builds treeswap's Debian package into target/debian/ and prints its path.
#
#   scripts/build-deb.sh [CARGO_DEB_OPTION...]      then: dpkg -i target/debian/treeswap_*.deb
#
# Three steps, each printed: `cargo build --release` of the binary; the man pages and the
# bash/zsh/fish completions generated from the command line (examples/gen-docs.rs) into
# <target dir>/release/gen-docs/; `cargo deb --no-build`, which packs what
# [package.metadata.deb] in Cargo.toml lists. Older treeswap_*.deb files in target/debian/
# are removed first, so the install command above matches one file.
#
# Needs cargo-deb (installed with `cargo install --locked cargo-deb` when missing: a few
# minutes, once) and dpkg-shlibdeps from dpkg-dev (it computes the libc6 dependency;
# installed with apt-get when missing and run as root).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$PATH:$HOME/.cargo/bin"
say() { printf '[build-deb.sh] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if ! command -v cargo-deb >/dev/null; then
  say "installing cargo-deb (cargo install --locked cargo-deb; a few minutes, once)"
  cargo install --locked cargo-deb >&2
fi
if ! command -v dpkg-shlibdeps >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing dpkg-dev (for dpkg-shlibdeps)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev >&2
  else
    die "dpkg-shlibdeps is missing: apt-get install dpkg-dev"
  fi
fi

target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
gen=$target/release/gen-docs
out=$repo/target/debian

say "cargo build --release --bin treeswap"
cargo build --release --bin treeswap >&2
say "generating the man pages and completions into $gen (cargo run --release --example gen-docs)"
# Afresh, so that a page of a command that no longer exists is not packaged.
rm -rf "$gen"
# The pages' date: the last commit's, so that one commit gives the same pages.
date=$(git -C "$repo" log -1 --format=%cs 2>/dev/null || date -u +%F)
cargo run --release --quiet --example gen-docs -- "$gen" "$date" >&2
# Debian wants man pages compressed; cargo-deb compresses only files that are not build
# output. -n: no name or time stamp, so the same page gives the same bytes.
gzip -9n "$gen"/man/*.8
say "cargo deb --no-build -o $out/"
mkdir -p "$out"
rm -f "$out"/treeswap_*.deb
cargo deb --no-build -o "$out/" "$@" >&2
debs=("$out"/treeswap_*.deb)
[ ${#debs[@]} -eq 1 ] && [ -f "${debs[0]}" ] || die "expected one treeswap_*.deb in $out"
say "built ${debs[0]}"
echo "${debs[0]}"
