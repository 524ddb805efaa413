# Shared by the guest hooks in this directory (sourced, not run). treeswap runs a hook with
# TREESWAP_GUEST, TREESWAP_VERSION, TREESWAP_PREVIOUS, TREESWAP_ROOTFS and
# TREESWAP_STATE_ROOT in its environment (README, "Guests").
set -eu

die() {
    echo "$0: $*" >&2
    exit 1
}

[ -n "${TREESWAP_GUEST:-}" ] || die "TREESWAP_GUEST is not set: run me as a treeswap guest hook"
name=$TREESWAP_GUEST
# Pid files and logs of guests run without a service manager.
rundir=${TREESWAP_GUEST_RUNDIR:-/run/treeswap-guests}

# starttime PID: when PID started (field 22 of /proc/PID/stat, in clock ticks since boot):
# with the pid, it names one process, never a later one that reuses the pid.
starttime() {
    sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20
}

# alive PID NAME [START]: whether PID is a live (not zombie) process whose command line has
# NAME and, given START, that started then (see starttime).
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    state=$(sed 's/^.*) //' "/proc/$1/stat" | cut -d' ' -f1)
    [ "$state" != Z ] || return 1
    [ -z "${3:-}" ] || [ "$(starttime "$1")" = "$3" ] || return 1
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"
}

# stop_pid PIDFILE NAME SECONDS: SIGTERM the process PIDFILE names ("PID [START]", if it is
# still NAME and, with START, still the process that started then), SIGKILL it after
# SECONDS, wait until it is gone, remove PIDFILE. Fine if nothing runs.
stop_pid() {
    [ -f "$1" ] || return 0
    read -r pid start <"$1" || true
    if alive "$pid" "$2" "${start:-}"; then
        kill -TERM "$pid" 2>/dev/null || true
        i=0
        while alive "$pid" "$2" "${start:-}"; do
            i=$((i + 1))
            if [ "$i" -eq $(($3 * 20)) ]; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
            [ "$i" -lt $(($3 * 20 + 100)) ] || die "$2 (pid $pid) does not stop"
            sleep 0.05
        done
    fi
    rm -f "$1"
}

# tail_log FILE: the last lines of a guest's log, for treeswap's error line.
tail_log() {
    [ -f "$1" ] && tail -n 3 "$1" || true
}
