#!/bin/bash
# bench-update.sh - `treeswap update` of a real Debian point release from nginx on loopback,
# against its peer `curl -o FILE URL && treeswap apply FILE`, in bytes fetched and wall time.
#
# Usage: bench-update.sh [REPS]        (as root; any cwd; REPS defaults to 3)
#
# The update: the cached debootstrap --variant=minbase bookworm tree and its copy after a
# real `apt-get upgrade` (lib.sh). Untimed setup: a server root publishes both as versions
# 1 and 2 of channel `stable` (signed, minisign) into a repository that Debian's nginx
# serves on 127.0.0.1 (a config written here); before each timed step, a fresh client root
# imports the base as version 1 (current).
# Timed, each REPS times, order alternating between rounds, cold cache (drop_caches) before
# each step, the step being the command then `sync`:
#   treeswap update --url http://127.0.0.1:PORT              (index, signature, delta, apply)
#   curl -sS -o FILE URL-of-the-delta && treeswap apply FILE  (the peer: the same delta)
# Then once, not timed: `treeswap update` through a TCP proxy (python3, here) that cuts the
# first three connections, each after a quarter of the delta's bytes.
# Bytes: what nginx sent for the run (its access log: index, signature, delta), and what the
# proxy forwarded in the run with cuts, over the delta's size.
# Goals (issue 18): bytes fetched <= 1.01x the chosen delta's size; with three cuts
# <= 1.05x; wall time of update <= 1.1x curl + apply. Prints PASS, MARGINAL (a time whose
# samples put it on either side of its goal, at least 10% either side of the median ratio:
# lib.sh's ts_judge_times) or FAIL per goal and exits 0 either way (a benchmark); non-zero
# only if a command fails or a result is wrong.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
trap 'bench_stop; ts_cleanup' EXIT

REPS=${1:-3}
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [REPS]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (drop_caches, root-owned trees)"
ensure_pkgs nginx-light curl minisign time python3
base_src=$(bookworm_tree)
new_src=$(bookworm_upgraded_tree)
build_treeswap
ts_mktemp
W=$TS_TMP
NGINX_PID="" PROXY_PID=""
bench_stop() {
    [ -z "$NGINX_PID" ] || kill "$NGINX_PID" 2>/dev/null || true
    [ -z "$PROXY_PID" ] || kill "$PROXY_PID" 2>/dev/null || true
}

# A free port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

log "setup (untimed): publish 1 and 2 from a server root, start nginx"
minisign -G -W -p "$W/release.pub" -s "$W/release.key" > /dev/null
printf '[trust]\npublic_keys = ["%s"]\n' "$W/release.pub" > "$W/client.toml"
"$TREESWAP" -q --root "$W/server" init
"$TREESWAP" -q --root "$W/server" publish --repo "$W/repo" --channel stable --version 1 \
    --from-dir "$base_src" --sign "$W/release.key"
"$TREESWAP" -q --root "$W/server" publish --repo "$W/repo" --channel stable --version 2 \
    --from-dir "$new_src" --sign "$W/release.key"
digest1=$(python3 -c 'import sys, tomllib; ix = tomllib.load(open(sys.argv[1], "rb")); print([v["digest"] for v in ix["version"] if v["name"] == "1"][0])' "$W/repo/stable/index.toml")
rel="stable/deltas/2/$digest1.delta"
[ -f "$W/repo/$rel" ] || die "publish wrote no delta $rel"
dsize=$(stat -c %s "$W/repo/$rel")

port=$(free_port)
mkdir -p "$W/nginx"
cat > "$W/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log;
events { worker_connections 64; }
http {
  default_type application/octet-stream;
  log_format t '\$status \$body_bytes_sent "\$http_range" \$request_uri';
  access_log $W/nginx/access.log t;
  client_body_temp_path $W/nginx/body;
  proxy_temp_path $W/nginx/proxy;
  fastcgi_temp_path $W/nginx/fastcgi;
  uwsgi_temp_path $W/nginx/uwsgi;
  scgi_temp_path $W/nginx/scgi;
  server { listen 127.0.0.1:$port; root $W/repo; }
}
EOF
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" > /dev/null 2>&1 &
NGINX_PID=$!
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
done
URL="http://127.0.0.1:$port"

# client NAME: a fresh client root with the base installed as 1, current.
client() {
    [ ! -e "$W/$1" ] || _ts_rm_tree "$W/$1"
    "$TREESWAP" -q --root "$W/$1" init
    "$TREESWAP" -q --root "$W/$1" import "$base_src" --version 1 --activate --no-restart
}
# nginx_bytes: the bytes nginx's access log records so far.
nginx_bytes() { awk '{ s += $2 } END { print s + 0 }' "$W/nginx/access.log"; }

declare -A wall cpu
# timed KEY CMD...: drop caches, run CMD then sync under GNU time; append wall and CPU s.
timed() {
    local key=$1 t
    shift
    drop_caches
    /usr/bin/time -f '%e %U %S' -o "$W/time.out" bash -c '"$@" && sync' bash "$@" \
        > "$W/last.out" 2>&1 || { tail -20 "$W/last.out" >&2; die "failed: $*"; }
    t=$(tail -1 "$W/time.out")
    wall[$key]+="$(awk '{ printf "%.2f", $1 }' <<<"$t") "
    cpu[$key]+="$(awk '{ printf "%.2f", $2 + $3 }' <<<"$t") "
}
upd_bytes=""
run_update() {
    client upd
    local b0
    b0=$(nginx_bytes)
    timed update "$TREESWAP" -q --config "$W/client.toml" --root "$W/upd" update --url "$URL" \
        --no-restart
    [ "$(readlink "$W/upd/current")" = trees/2 ] || die "update did not make 2 current"
    upd_bytes+="$(($(nginx_bytes) - b0)) "
}
run_peer() {
    client peer
    rm -f "$W/peer.delta"
    timed peer bash -c "curl -sS -o '$W/peer.delta' '$URL/$rel' && '$TREESWAP' -q --config '$W/client.toml' --root '$W/peer' apply '$W/peer.delta' --no-restart"
    [ "$(readlink "$W/peer/current")" = trees/2 ] || die "apply did not make 2 current"
}

load_before=$(ts_loadavg)
for ((i = 1; i <= REPS; i++)); do
    log "round $i/$REPS"
    if ((i % 2)); then run_update; run_peer; else run_peer; run_update; fi
done
load_after=$(ts_loadavg)

log "checking the result: trees/2 of the updated client against the new tree"
"$TS_SCRIPTS/compare-trees.sh" "$new_src" "$W/upd/current/" > "$W/cmp.out" \
    || { head -20 "$W/cmp.out" >&2; die "update did not make the new tree"; }

log "once more through a proxy that cuts the first three connections"
cat > "$W/proxy.py" <<'EOF'
# A TCP proxy on 127.0.0.1:LISTEN in front of 127.0.0.1:UPSTREAM: the first CUTS connections
# are closed after CUT_AFTER bytes of response each; the bytes forwarded to clients are
# written to COUNT_FILE after each connection.
import socket, sys, threading
listen, upstream, cuts, cut_after, count_file = sys.argv[1:6]
state = {"cuts": int(cuts), "sent": 0}
lock = threading.Lock()
def pipe(src, dst):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(c):
    s = socket.create_connection(("127.0.0.1", int(upstream)))
    threading.Thread(target=pipe, args=(c, s), daemon=True).start()
    # A connection uses up a cut once it carries a response (a bare probe does not).
    cut = None
    n = 0
    try:
        while True:
            want = 65536 if not cut else min(65536, int(cut_after) - n)
            if want <= 0:
                break
            b = s.recv(want)
            if not b:
                break
            if cut is None:
                with lock:
                    cut = state["cuts"] > 0
                    state["cuts"] -= 1
                if cut and len(b) > int(cut_after):
                    b = b[: int(cut_after)]
            c.sendall(b)
            n += len(b)
    except OSError:
        pass
    for x in (c, s):
        try:
            x.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        x.close()
    with lock:
        state["sent"] += n
        with open(count_file, "w") as f:
            f.write(str(state["sent"]))
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(listen)))
l.listen(16)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
pport=$(free_port)
echo 0 > "$W/proxy.count"
python3 "$W/proxy.py" "$pport" "$port" 3 $((dsize / 4)) "$W/proxy.count" &
PROXY_PID=$!
# Wait until it listens (a bare connect: no request, so no cut is used up).
python3 -c 'import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close(); sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)' "$pport" || die "the proxy did not start"
client cut
b0=$(nginx_bytes)
"$TREESWAP" --config "$W/client.toml" --root "$W/cut" update --url "http://127.0.0.1:$pport" \
    --no-restart --json > "$W/cut.json" 2> "$W/cut.err" \
    || { cat "$W/cut.err" >&2; die "update through the cutting proxy failed"; }
[ "$(readlink "$W/cut/current")" = trees/2 ] || die "the update with cuts did not make 2 current"
sleep 0.2
cut_bytes=$(cat "$W/proxy.count")
cut_ranges=$(awk -v p="$rel" '$4 == "/" p && $3 ~ /bytes=/' "$W/nginx/access.log" | wc -l)
cut_fetched=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["fetched"])' "$W/cut.json")

u_bytes=$(ts_median "$upd_bytes")
r_bytes=$(ts_ratio "$u_bytes" "$dsize")
r_cut=$(ts_ratio "$cut_bytes" "$dsize")
w_u=$(ts_median "${wall[update]}"); c_u=$(ts_median "${cpu[update]}")
w_p=$(ts_median "${wall[peer]}"); c_p=$(ts_median "${cpu[peer]}")
r_time=$(ts_ratio "$w_u" "$w_p")
# Exact ratios for the verdicts (ts_ratio rounds to 2 decimals: 1.014 would print 1.01).
x_bytes=$(awk -v a="$u_bytes" -v b="$dsize" 'BEGIN { printf "%.4f", a / b }')
x_cut=$(awk -v a="$cut_bytes" -v b="$dsize" 'BEGIN { printf "%.4f", a / b }')

echo
echo "update: $base_src -> $new_src, from nginx on 127.0.0.1"
echo "  the delta: $rel, $dsize bytes; update makes the new tree: $(tail -1 "$W/cmp.out")"
echo "method: cold cache (drop_caches before each step), command + sync, median of $REPS"
echo "load average before: $load_before, after: $load_after ($(nproc) CPUs)"
echo "treeswap: $("$TREESWAP" --version 2>/dev/null || echo "$TREESWAP"); $(curl --version | head -1 | cut -d' ' -f1-2); $(nginx -v 2>&1)"
echo
printf '%-52s %7s %7s   %s\n' "" "wall s" "cpu s" "wall samples (s), spread"
printf '%-52s %7s %7s   %s\n' "treeswap update" "$w_u" "$c_u" "${wall[update]}, $(ts_spread "${wall[update]}")"
printf '%-52s %7s %7s   %s\n' "curl -o FILE URL && treeswap apply FILE" "$w_p" "$c_p" "${wall[peer]}, $(ts_spread "${wall[peer]}")"
echo
echo "bytes nginx sent per update (index, signature, delta): $upd_bytes"
echo "with three cuts: the proxy forwarded $cut_bytes bytes; treeswap fetched $cut_fetched;" \
    "$cut_ranges range request(s) for the delta"
echo
printf 'goal bytes: fetched / delta <= 1.01:            %6sx  %s\n' "$r_bytes" "$(ts_judge "$x_bytes" 1.01)"
printf 'goal bytes with 3 cuts: fetched / delta <= 1.05: %5sx  %s\n' "$r_cut" "$(ts_judge "$x_cut" 1.05)"
printf 'goal time: update / (curl + apply) <= 1.1:      %6sx  %s   (cpu: %sx)\n' \
    "$r_time" "$(ts_judge_times "${wall[update]}" "${wall[peer]}" 1.1)" "$(ts_ratio "$c_u" "$c_p")"
