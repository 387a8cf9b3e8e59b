#!/usr/bin/env bash
# Idle cost of wgmeshd (issue 17): how often an idle daemon with many
# configured peers wakes up.
#
# Starts wgmeshd in a network namespace of its own with $IDLE_PEERS peers
# (keys, endpoints in 10.97.0.0/16, which nothing answers, allowed IPs; no
# traffic), configured either with `wg setconf` (IDLE_MODE=uapi, the
# default) or from a config file with disco keys (IDLE_MODE=config: the mesh
# daemon with its discovery and MagicDNS), lets it settle for $IDLE_SETTLE_SECONDS s, then counts the
# context switches of all its threads (voluntary + nonvoluntary, from
# /proc/PID/task/*/status) over $IDLE_SECONDS s. Every switch is a wake-up
# (a thread that sleeps and is woken again switches at least once).
# Last line: "idle wgmeshd, N peers: W wake-ups/s".
#
# Needs root, iproute2 and wireguard-tools. Deletes its namespace and kills
# the daemon on exit; every wait is bounded.
#
# Usage: bench/idle/run.sh [WGMESHD_BINARY]
# Environment: IDLE_PEERS (1000), IDLE_SECONDS (60), IDLE_SETTLE_SECONDS (5),
# IDLE_MODE (uapi or config), WGMESHD_ENV (extra environment of the daemon).
set -euo pipefail

WGMESHD=${1:-target/release/wgmeshd}
PEERS=${IDLE_PEERS:-1000}
SECONDS_MEASURED=${IDLE_SECONDS:-60}
SETTLE=${IDLE_SETTLE_SECONDS:-5}
MODE=${IDLE_MODE:-uapi}
NS=wgidle-a
IFACE=wgidle0
TMP=$(mktemp -d /tmp/wgmesh-idle.XXXXXX)
DAEMON=""

die() { echo "idle: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespace, TUN device)"
command -v wg >/dev/null || die "needs wg (wireguard-tools)"
[ -x "$WGMESHD" ] || die "no wgmeshd at $WGMESHD"
[ "$PEERS" -ge 1 ] && [ "$PEERS" -le 60000 ] || die "IDLE_PEERS must be 1..60000"
[ "$SECONDS_MEASURED" -ge 1 ] && [ "$SECONDS_MEASURED" -le 600 ] || die "IDLE_SECONDS must be 1..600"
[ "$MODE" = uapi ] || [ "$MODE" = config ] || die "IDLE_MODE must be uapi or config"
WGMESHD=$(realpath "$WGMESHD")

cleanup() {
    set +e
    if [ -n "$DAEMON" ]; then
        kill -TERM "$DAEMON" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DAEMON" 2>/dev/null
    fi
    ip netns del "$NS" 2>/dev/null
    rm -f "/var/run/wireguard/$IFACE.sock"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
ip -n "$NS" link set lo up

# The configuration: one private key, $PEERS peers with distinct keys,
# endpoints and allowed IPs. Peers' keys are random bytes (a peer is
# configured by its public key only).
(umask 077; wg genkey >"$TMP/key"; wg genkey >"$TMP/disco")
python3 - "$MODE" "$PEERS" "$(cat "$TMP/key")" "$(cat "$TMP/disco")" "$IFACE" >"$TMP/conf" <<'PY'
import base64, os, sys
mode, peers, key, disco, iface = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def random_key():
    return base64.b64encode(os.urandom(32)).decode()
if mode == "uapi":
    print("[Interface]\nPrivateKey = %s\nListenPort = 51999\n" % key)
else:
    print('[interface]\nname = "%s"\nprivate_key = "%s"\ndisco_private_key = "%s"\n'
          'listen_port = 51999\naddresses = ["10.96.0.1/32"]\n\n[dns]\nmode = "off"\n' % (iface, key, disco))
for i in range(peers):
    a, b = divmod(i + 2, 250)
    endpoint = "10.97.%d.%d:51820" % (a, b + 1)
    allowed = "10.96.%d.%d/32" % (a, b + 1)
    if mode == "uapi":
        print("[Peer]\nPublicKey = %s\nEndpoint = %s\nAllowedIPs = %s\n" % (random_key(), endpoint, allowed))
    else:
        print('[[peer]]\nname = "peer-%d"\npublic_key = "%s"\ndisco_key = "%s"\n'
              'endpoints = ["%s"]\nallowed_ips = ["%s"]\n' % (i, random_key(), random_key(), endpoint, allowed))
PY

rm -f "/var/run/wireguard/$IFACE.sock"
if [ "$MODE" = uapi ]; then
    # shellcheck disable=SC2086
    ip netns exec "$NS" env RUST_LOG=warn ${WGMESHD_ENV:-} "$WGMESHD" --foreground \
        --interface "$IFACE" --state-dir "$TMP/state" --resolv-conf "$TMP/resolv" >"$TMP/log" 2>&1 &
    ready="/var/run/wireguard/$IFACE.sock"
else
    chmod 600 "$TMP/conf"
    # shellcheck disable=SC2086
    ip netns exec "$NS" env RUST_LOG=warn ${WGMESHD_ENV:-} "$WGMESHD" --foreground \
        --config "$TMP/conf" --state-dir "$TMP/state" --resolv-conf "$TMP/resolv" >"$TMP/log" 2>&1 &
    ready="$TMP/state/$IFACE.sock"
fi
DAEMON=$!
for _ in $(seq 100); do
    [ -S "$ready" ] && break
    kill -0 "$DAEMON" 2>/dev/null || { tail -5 "$TMP/log" >&2; die "wgmeshd exited"; }
    sleep 0.05
done
[ -S "$ready" ] || die "wgmeshd did not open $ready"
if [ "$MODE" = uapi ]; then
    ip netns exec "$NS" wg setconf "$IFACE" "$TMP/conf"
    ip -n "$NS" addr add 10.96.0.1/16 dev "$IFACE"
    ip -n "$NS" link set "$IFACE" up
fi
if [ "$MODE" = uapi ]; then
    configured=$(ip netns exec "$NS" wg show "$IFACE" peers | wc -l)
    [ "$configured" = "$PEERS" ] || die "$configured peers configured, wanted $PEERS"
fi
echo "# wgmeshd $WGMESHD ($MODE): $PEERS peers, settling ${SETTLE} s, measuring ${SECONDS_MEASURED} s" >&2
sleep "$SETTLE"

switches() { # pid -> total context switches of all its threads, and the per-thread list
    local total=0 task n name
    for task in /proc/"$1"/task/*; do
        n=$(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {s += $2} END {print s + 0}' "$task/status" 2>/dev/null || echo 0)
        total=$((total + n))
    done
    echo "$total"
}
per_thread() { # pid -> "name:switches" per thread
    local task
    for task in /proc/"$1"/task/*; do
        printf '%s:%s ' "$(cat "$task/comm" 2>/dev/null)" \
            "$(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {s += $2} END {print s + 0}' "$task/status" 2>/dev/null)"
    done
    echo
}
before=$(switches "$DAEMON"); threads_before=$(per_thread "$DAEMON")
sleep "$SECONDS_MEASURED"
after=$(switches "$DAEMON"); threads_after=$(per_thread "$DAEMON")
kill -0 "$DAEMON" 2>/dev/null || die "wgmeshd exited during the measurement"
echo "# threads before: $threads_before" >&2
echo "# threads after:  $threads_after" >&2
awk -v d=$((after - before)) -v s="$SECONDS_MEASURED" -v p="$PEERS" \
    'BEGIN {printf "idle wgmeshd, %d peers ('"$MODE"'): %.2f wake-ups/s (%d context switches in %d s)\n", p, d / s, d, s}'
