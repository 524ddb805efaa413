#!/bin/sh
# install-boot.sh - installs treeswap's boot integration: the systemd units (default) or the
# SysV init script, with the path of the treeswap binary and of the defaults file written in,
# and the state root and config in the defaults file the units and the script read; with
# --update also the update timer and service (or, with --sysv, the cron line). Enables and
# starts nothing, except that cron runs a cron line as soon as it is in place (--sysv
# --update): it prints the command that does.
#
# Usage: install-boot.sh [--bin PATH] [--root DIR] [--config FILE] [--sysv] [--update]
#                        [--dest DIR] [--cron-dest DIR] [--defaults FILE]
#   --bin       the treeswap binary (default: `command -v treeswap`)
#   --root      the state root, written to the defaults file as TREESWAP_ROOT
#   --config    the config file, written to the defaults file as TREESWAP_CONFIG
#   --sysv      install scripts/boot/treeswap.init as DEST/treeswap instead of the units
#   --update    also install treeswap-update.service and .timer (the config's `[update] url`
#               names the repository); with --sysv, scripts/boot/treeswap-update.cron as
#               CRON-DEST/treeswap-update instead, which cron runs from then on
#   --dest      where to install (default /etc/systemd/system, or /etc/init.d with --sysv)
#   --cron-dest where --sysv --update puts the cron line (default /etc/cron.d)
#   --defaults  the defaults file (default /etc/default/treeswap); written only when --root
#               or --config is given
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin="" root="" config="" sysv=0 update=0 dest="" crondest=/etc/cron.d
defaults=/etc/default/treeswap
die() { echo "install-boot.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --sysv) sysv=1; shift ;;
    --update) update=1; shift ;;
    --dest) dest=$2; shift 2 ;;
    --cron-dest) crondest=$2; shift 2 ;;
    --defaults) defaults=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown argument \`$1' (see --help)" ;;
  esac
done
[ -n "$bin" ] || bin=$(command -v treeswap) || die "no treeswap on PATH; give --bin"
case "$bin" in /*) ;; *) bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin") ;; esac
[ -x "$bin" ] || die "\`$bin' is not an executable"
"$bin" --version >/dev/null || die "\`$bin --version' failed"
case "$defaults" in /*) ;; *) die "--defaults: give an absolute path" ;; esac
for v in "$bin" "$root" "$config" "$defaults"; do
  case "$v" in *[!A-Za-z0-9/._+-]*) die "\`$v': use a path of letters, digits and /._+-" ;; esac
done

# put SRC DEST MODE: SRC with the binary's and the defaults file's paths written in, as DEST
# (written to DEST.tmp, then renamed).
put() {
  sed -e "s|/usr/sbin/treeswap |$bin |g" \
    -e "s|^TREESWAP=\${TREESWAP:-/usr/sbin/treeswap}|TREESWAP=\${TREESWAP:-$bin}|" \
    -e "s|/etc/default/treeswap|$defaults|g" "$1" > "$2.tmp"
  chmod "$3" "$2.tmp"
  mv "$2.tmp" "$2"
}

if [ "$sysv" = 1 ]; then
  dest=${dest:-/etc/init.d}
  mkdir -p "$dest"
  put "$here/boot/treeswap.init" "$dest/treeswap" 755
  echo "installed $dest/treeswap; enable it with: update-rc.d treeswap defaults"
  if [ "$update" = 1 ]; then
    mkdir -p "$crondest"
    put "$here/boot/treeswap-update.cron" "$crondest/treeswap-update" 644
    echo "installed $crondest/treeswap-update: cron runs \`treeswap update' every six hours from now on"
  fi
else
  dest=${dest:-/etc/systemd/system}
  mkdir -p "$dest"
  units="treeswap-boot.service treeswap-mark-good.service treeswap-mark-good.timer"
  enable="treeswap-boot.service treeswap-mark-good.timer"
  if [ "$update" = 1 ]; then
    units="$units treeswap-update.service treeswap-update.timer"
    enable="$enable treeswap-update.timer"
  fi
  for u in $units; do
    put "$here/boot/$u" "$dest/$u" 644
  done
  echo "installed the units in $dest; enable them with:"
  echo "  systemctl daemon-reload && systemctl enable $enable"
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
