#!/bin/sh
# install-boot.sh - installs treeswap's boot integration: the systemd units (default) or the
# SysV init script, with the path of the treeswap binary written in, and the state root and
# config in the environment file the units and the script read. Enables and starts nothing:
# it prints the command that does.
#
# Usage: install-boot.sh [--bin PATH] [--root DIR] [--config FILE] [--sysv]
#                        [--dest DIR] [--defaults FILE]
#   --bin       the treeswap binary (default: `command -v treeswap`)
#   --root      the state root, written to the defaults file as TREESWAP_ROOT
#   --config    the config file, written to the defaults file as TREESWAP_CONFIG
#   --sysv      install scripts/boot/treeswap.init as DEST/treeswap instead of the units
#   --dest      where to install (default /etc/systemd/system, or /etc/init.d with --sysv)
#   --defaults  the environment file (default /etc/default/treeswap); written only when
#               --root or --config is given
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin="" root="" config="" sysv=0 dest="" defaults=/etc/default/treeswap
die() { echo "install-boot.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --sysv) sysv=1; shift ;;
    --dest) dest=$2; shift 2 ;;
    --defaults) defaults=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument \`$1' (see --help)" ;;
  esac
done
[ -n "$bin" ] || bin=$(command -v treeswap) || die "no treeswap on PATH; give --bin"
case "$bin" in /*) ;; *) bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin") ;; esac
[ -x "$bin" ] || die "\`$bin' is not an executable"
"$bin" --version >/dev/null || die "\`$bin --version' failed"
for v in "$bin" "$root" "$config"; do
  case "$v" in *[!A-Za-z0-9/._+-]*) die "\`$v': use a path of letters, digits and /._+-" ;; esac
done
if [ "$sysv" = 1 ]; then
  dest=${dest:-/etc/init.d}
  mkdir -p "$dest"
  sed "s|^TREESWAP=\${TREESWAP:-/usr/sbin/treeswap}|TREESWAP=\${TREESWAP:-$bin}|" \
    "$here/boot/treeswap.init" > "$dest/treeswap.tmp"
  chmod 755 "$dest/treeswap.tmp"
  mv "$dest/treeswap.tmp" "$dest/treeswap"
  echo "installed $dest/treeswap; enable it with: update-rc.d treeswap defaults"
else
  dest=${dest:-/etc/systemd/system}
  mkdir -p "$dest"
  for u in treeswap-boot.service treeswap-mark-good.service treeswap-mark-good.timer; do
    sed "s|/usr/sbin/treeswap |$bin |" "$here/boot/$u" > "$dest/$u.tmp"
    chmod 644 "$dest/$u.tmp"
    mv "$dest/$u.tmp" "$dest/$u"
  done
  echo "installed the units in $dest; enable them with:"
  echo "  systemctl daemon-reload && systemctl enable treeswap-boot.service treeswap-mark-good.timer"
fi
if [ -n "$root$config" ]; then
  mkdir -p "$(dirname "$defaults")"
  {
    echo "# treeswap's boot integration reads this (scripts/install-boot.sh wrote it)"
    [ -z "$root" ] || echo "TREESWAP_ROOT=$root"
    [ -z "$config" ] || echo "TREESWAP_CONFIG=$config"
  } > "$defaults.tmp"
  mv "$defaults.tmp" "$defaults"
  echo "wrote $defaults"
fi
