#!/usr/bin/env bash
# End-to-end test of the router after the tunnel interface itself goes down
# and up: the kernel drops every route through a link that goes down (the
# exit-node table's too) and its IPv6 addresses; wgmeshd watches the
# tunnel's link state and puts them back when it comes up, without a
# restart or a reload.
#
# Two namespaces joined by a veth pair (10.79.0.1 / .2): node A routes B's
# subnet 10.99.0.0/24 (10.99.0.1 on B's loopback) through the tunnel and
# uses B as its exit node (default routes in table 52 behind policy rules).
# Needs root and iproute2. Everything it creates it deletes on exit, also
# on failure. Every wait is bounded.
# Usage: adapters/tests/e2e-router.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
NS_A=wgm-rtr-a
NS_B=wgm-rtr-b
ALL_NS=("$NS_A" "$NS_B")
EXIT_TABLE=52
umask 077
PASSED=0
FAILED=0
SKIPPED=0
PIDS=()

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    echo "e2e-router: needs root and iproute2; skipping"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi
TMP=$(mktemp -d /tmp/wgmesh-e2e-rtr.XXXXXX)

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if [ "${E2E_KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap "exit 130" INT TERM

check() {
    local name=$1; shift
    if "$@" >"$TMP/out" 2>&1; then
        PASSED=$((PASSED + 1)); echo "ok   $name"
    else
        FAILED=$((FAILED + 1)); echo "FAIL $name"; sed 's/^/     /' "$TMP/out" | tail -30
    fi
}

for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
for ns in "${ALL_NS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add veth-a netns "$NS_A" type veth peer name veth-b netns "$NS_B"
ip -n "$NS_A" addr add 10.79.0.1/24 dev veth-a
ip -n "$NS_B" addr add 10.79.0.2/24 dev veth-b
ip -n "$NS_A" link set veth-a up
ip -n "$NS_B" link set veth-b up
# An address of B's subnet (on its loopback), reached from A through the
# tunnel.
ip -n "$NS_B" addr add 10.99.0.1/32 dev lo

KEY_A=$("$WGMESH" genkey); PUB_A=$(echo "$KEY_A" | "$WGMESH" pubkey)
KEY_B=$("$WGMESH" genkey); PUB_B=$(echo "$KEY_B" | "$WGMESH" pubkey)

cat >"$TMP/a.toml" <<CONF
[interface]
name = "wgrA"
private_key = "$KEY_A"
listen_port = 51820
addresses = ["100.64.2.1/32", "fd7a:115c:a1e0::2:1/128"]
mtu = 1280

[dns]
mode = "off"

[exit_node]
peer = "node-b"

[[peer]]
name = "node-b"
public_key = "$PUB_B"
endpoints = ["10.79.0.2:51820"]
allowed_ips = ["100.64.2.2/32", "fd7a:115c:a1e0::2:2/128", "10.99.0.0/24"]
CONF
cat >"$TMP/b.toml" <<CONF
[interface]
name = "wgrB"
private_key = "$KEY_B"
listen_port = 51820
addresses = ["100.64.2.2/32", "fd7a:115c:a1e0::2:2/128"]
mtu = 1280

[dns]
mode = "off"

[[peer]]
name = "node-a"
public_key = "$PUB_A"
endpoints = ["10.79.0.1:51820"]
allowed_ips = ["100.64.2.1/32", "fd7a:115c:a1e0::2:1/128"]
CONF

start() { # ns n
    local ns=$1 n=$2
    mkdir -p "$TMP/state-$n"
    ip netns exec "$ns" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" --no-uapi >"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$TMP/state-$n/wgr${n^^}.sock" ] && return 0; sleep 0.1; done
    echo "wgmeshd $n did not start"; cat "$TMP/$n.log"; return 1
}
in_a() { ip netns exec "$NS_A" "$@"; }

# What A's kernel has for the tunnel, one item a line.
routes_of_a() {
    ip -n "$NS_A" route show dev wgrA | awk '{print $1}'
    ip -n "$NS_A" -6 addr show dev wgrA scope global | awk '/inet6/ {print $2}'
    ip -n "$NS_A" route show table "$EXIT_TABLE" | awk '{print "table52:" $1}'
}
has_everything() {
    local now
    now=$(routes_of_a)
    for want in 10.99.0.0/24 100.64.2.2 fd7a:115c:a1e0::2:1/128 table52:default; do
        echo "$now" | grep -qx "$want" || { echo "missing $want; have:"; echo "$now"; return 1; }
    done
}
wait_everything() { # tries of 0.1 s
    for _ in $(seq "$1"); do has_everything >/dev/null 2>&1 && return 0; sleep 0.1; done
    has_everything
}
ping_until() { # addr tries
    for _ in $(seq "$2"); do in_a ping -c 1 -W 0.3 "$1" >/dev/null 2>&1 && return 0; done
    return 1
}

start "$NS_A" a
start "$NS_B" b

up_and_routed() {
    wait_everything 100 || return 1
    ping_until 100.64.2.2 20 || { echo "A->B tailnet address"; return 1; }
    ping_until 10.99.0.1 20 || { echo "A->B's subnet"; return 1; }
    ip -n "$NS_A" rule >"$TMP/rules" || return 1
    grep -q "lookup $EXIT_TABLE" "$TMP/rules" || { echo "no policy rule for table $EXIT_TABLE"; cat "$TMP/rules"; return 1; }
}
check "A routes B's subnet and its exit table through the tunnel" up_and_routed

down_drops_routes() {
    ip -n "$NS_A" link set wgrA down || return 1
    sleep 0.5
    # The premise: the kernel itself dropped them.
    ! has_everything >/dev/null 2>&1 || { echo "the kernel kept the routes; nothing to restore"; return 1; }
    routes_of_a
}
check "setting the tunnel down drops its routes, IPv6 address and exit table (kernel)" down_drops_routes

up_restores_routes() {
    local t0 t1
    t0=$(date +%s.%N)
    ip -n "$NS_A" link set wgrA up || return 1
    wait_everything 50 || return 1
    t1=$(date +%s.%N)
    echo "     routes back $(python3 -c "print(f'{$t1 - $t0:.2f}')") s after the tunnel came up" >&2
    grep -q "tunnel interface up again: routes restored" "$TMP/a.log" || { echo "no log line"; return 1; }
    ip -n "$NS_A" rule >"$TMP/rules" || return 1
    grep -q "lookup $EXIT_TABLE" "$TMP/rules" || { echo "the policy rule is gone"; cat "$TMP/rules"; return 1; }
    ping_until 10.99.0.1 20 || { echo "A->B's subnet after up"; return 1; }
    ping_until 100.64.2.2 20 || { echo "A->B after up"; return 1; }
    "$WGMESH" --socket "$TMP/state-a/wgrA.sock" status --json | python3 -c '
import json, sys
h = json.load(sys.stdin).get("health") or {}
bad = [p for p in h.get("problems", []) if p["subsystem"] == "router"]
sys.exit(1 if bad else 0)' || { echo "router health problem after the restore"; return 1; }
}
check "bringing it up again restores routes, IPv6 address, exit table and rules; traffic flows" up_restores_routes

twice() {
    ip -n "$NS_A" link set wgrA down && sleep 0.3 && ip -n "$NS_A" link set wgrA up || return 1
    wait_everything 50 || return 1
    ping_until 10.99.0.1 20 || return 1
}
check "a second down/up is restored too" twice

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
if [ "$FAILED" -gt 0 ]; then
    for n in a b; do echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-30}" "$TMP/$n.log"; done
    exit 1
fi
