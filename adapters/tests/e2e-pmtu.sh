#!/usr/bin/env bash
# End-to-end test of path-MTU discovery: a tunnel whose path has a link
# narrower than the tunnel's own MTU.
#
# The rig, every namespace and address made here and deleted on exit:
#   wgm-pmtu-a   node A, 10.210.0.2/24 on a 1500-byte link to the router
#   wgm-pmtu-r   a router: 10.210.0.1 towards A, 10.211.0.1 towards B on a
#                1360-byte link (it answers A's too-large datagrams with
#                ICMP "fragmentation needed")
#   wgm-pmtu-b   node B, 10.211.0.2/24 on the 1360-byte link
# Both nodes run wgmeshd with `path_mtu_discovery = true` and a tunnel MTU
# of 1420, which only fits a 1480-byte path (1420 + 60 over IPv4). The
# daemon must read the path MTU the kernel learned (1360), and answer the
# inner packets that do not fit with ICMP "fragmentation needed" / ICMPv6
# "packet too big" for 1300 bytes, so the inner TCP lowers its MSS and a
# large transfer completes; the counters and the log show the event.
# Needs root, iproute2 and python3. Every wait is bounded.
# Usage: adapters/tests/e2e-pmtu.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
TRAFFIC=$(realpath "$(dirname "$0")/e2e_traffic.py")
NS_A=wgm-pmtu-a
NS_R=wgm-pmtu-r
NS_B=wgm-pmtu-b
ALL_NS=("$NS_A" "$NS_B" "$NS_R")
NARROW_MTU=1360
TUNNEL_MTU=1420
# Configs hold keys inline: everything written is private.
umask 077
PASSED=0
FAILED=0
SKIPPED=0
PIDS=()
declare -A PID

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v python3 >/dev/null; then
    echo "e2e-pmtu: needs root, iproute2 and python3; skipping"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi
TMP=$(mktemp -d /tmp/wgmesh-e2e-pmtu.XXXXXX)

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
exec 3>&1
trap "exit 130" INT TERM

check() {
    local name=$1; shift
    if "$@" >"$TMP/out" 2>&1; then
        PASSED=$((PASSED + 1)); echo "ok   $name"
    else
        FAILED=$((FAILED + 1)); echo "FAIL $name"; sed 's/^/     /' "$TMP/out" | tail -30
    fi
}

# --- the rig ---------------------------------------------------------------
for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
for ns in "${ALL_NS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add eth0 netns "$NS_A" type veth peer name to-a netns "$NS_R"
ip link add eth0 netns "$NS_B" type veth peer name to-b netns "$NS_R"
ip -n "$NS_A" addr add 10.210.0.2/24 dev eth0
ip -n "$NS_R" addr add 10.210.0.1/24 dev to-a
ip -n "$NS_R" addr add 10.211.0.1/24 dev to-b
ip -n "$NS_B" addr add 10.211.0.2/24 dev eth0
ip -n "$NS_R" link set to-b mtu "$NARROW_MTU"
ip -n "$NS_B" link set eth0 mtu "$NARROW_MTU"
for dev in "$NS_A eth0" "$NS_R to-a" "$NS_R to-b" "$NS_B eth0"; do
    set -- $dev
    ip -n "$1" link set "$2" up
done
ip -n "$NS_A" route add default via 10.210.0.1
ip -n "$NS_B" route add default via 10.211.0.1
ip netns exec "$NS_R" sysctl -qw net.ipv4.ip_forward=1

KEY_A=$("$WGMESH" genkey); PUB_A=$(echo "$KEY_A" | "$WGMESH" pubkey)
KEY_B=$("$WGMESH" genkey); PUB_B=$(echo "$KEY_B" | "$WGMESH" pubkey)
DISCO_A=$("$WGMESH" genkey); DPUB_A=$(echo "$DISCO_A" | "$WGMESH" pubkey)
DISCO_B=$("$WGMESH" genkey); DPUB_B=$(echo "$DISCO_B" | "$WGMESH" pubkey)

# write_config n key disco ip peer-name peer-pub peer-disco peer-ip peer-endpoint
write_config() {
    cat <<CONF
[interface]
name = "wgmp$1"
private_key = "$2"
disco_private_key = "$3"
listen_port = 51820
addresses = ["$4/32", "fd7a:115c:a1e0::${4##*.}/128"]
mtu = $TUNNEL_MTU

[dns]
mode = "off"

[knobs]
path_mtu_discovery = true

[[peer]]
name = "$5"
public_key = "$6"
disco_key = "$7"
allowed_ips = ["$8/32", "fd7a:115c:a1e0::${8##*.}/128"]
endpoints = ["$9"]
CONF
}
write_config A "$KEY_A" "$DISCO_A" 100.64.0.1 node-b "$PUB_B" "$DPUB_B" 100.64.0.2 10.211.0.2:51820 >"$TMP/a.toml"
write_config B "$KEY_B" "$DISCO_B" 100.64.0.2 node-a "$PUB_A" "$DPUB_A" 100.64.0.1 10.210.0.2:51820 >"$TMP/b.toml"

start() { # ns n [env...]: wgmeshd for node n
    local ns=$1 n=$2
    shift 2
    mkdir -p "$TMP/state-$n"
    ip netns exec "$ns" env RUST_LOG="${E2E_LOG:-info}" "$@" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" >>"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
    PID[$n]=$!
    for _ in $(seq 100); do [ -S "$TMP/state-$n/wgmp${n^^}.sock" ] && return 0; sleep 0.1; done
    echo "wgmeshd $n did not start"; cat "$TMP/$n.log"; return 1
}
stop() { # n
    local pid=${PID[$1]}
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
api() { local n=$1; shift; "$WGMESH" --socket "$TMP/state-$n/wgmp${n^^}.sock" "$@"; }
counter() { # n name: one counter from node n's status
    api "$1" status --json >"$TMP/st-$1.json" 2>/dev/null || return 1
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["counters"].get(sys.argv[2], "missing"))' \
        "$TMP/st-$1.json" "$2"
}
# The kernel's learned path MTUs are per namespace: each run of the
# transfers starts from a kernel that knows only its links.
forget_path_mtus() {
    ip -n "$NS_A" route flush cache 2>/dev/null || true
    ip -n "$NS_B" route flush cache 2>/dev/null || true
}

start "$NS_A" a
start "$NS_B" b

narrow_path() {
    # A full-sized datagram with the don't-fragment bit cannot cross.
    if ip netns exec "$NS_A" ping -c 2 -W 1 -M do -s $((NARROW_MTU - 28 + 40)) 10.211.0.2; then
        echo "a $((NARROW_MTU + 40))-byte packet crossed the $NARROW_MTU-byte link"
        return 1
    fi
    ip netns exec "$NS_A" ping -c 1 -W 2 -M do -s $((NARROW_MTU - 28)) 10.211.0.2 || return 1
}
check "the rig: the path from A to B carries $NARROW_MTU bytes, no more" narrow_path

tunnel_up() {
    for _ in $(seq 10); do
        ip netns exec "$NS_A" ping -c 1 -W 1 100.64.0.2 >/dev/null 2>&1 && return 0
    done
    echo "no ping answered through the tunnel"
    return 1
}
check "the tunnel answers small pings" tunnel_up

# transfer SRC_NS DST_NS DST_ADDR BYTES LABEL: one TCP stream, checked by sha256
transfer() {
    local src=$1 dst=$2 addr=$3 bytes=$4 label=$5
    head -c "$bytes" /dev/urandom >"$TMP/blob"
    local want
    want=$(sha256sum "$TMP/blob" | cut -d' ' -f1)
    rm -f "$TMP/ready" "$TMP/got"
    ip netns exec "$dst" timeout 60 python3 "$TRAFFIC" tcp-recv "$addr" 5201 "$TMP/got" "$TMP/ready" &
    local recv=$!
    for _ in $(seq 50); do [ -e "$TMP/ready" ] && break; sleep 0.1; done
    local t0 t1
    t0=$(date +%s.%N)
    ip netns exec "$src" timeout 60 python3 "$TRAFFIC" tcp-send "$addr" 5201 "$TMP/blob" || {
        kill "$recv" 2>/dev/null; wait "$recv" 2>/dev/null; echo "the sender failed"; return 1; }
    wait "$recv" || { echo "the receiver failed"; return 1; }
    t1=$(date +%s.%N)
    [ "$(cut -d' ' -f1 "$TMP/got")" = "$want" ] || { echo "checksum differs: $(cat "$TMP/got") vs $want"; return 1; }
    echo "$label: $((bytes / 1000000)) MB in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s, sha256 matches" >&3
}

counted() { # n: the node counted a path-MTU change and answered with ICMP
    local changes answers drops
    changes=$(counter "$1" path_mtu_changes) || return 1
    answers=$(counter "$1" icmp_too_big_written) || return 1
    drops=$(counter "$1" drop_too_big_for_path) || return 1
    echo "node $1: path_mtu_changes $changes, icmp_too_big_written $answers, drop_too_big_for_path $drops" >&3
    [ "$changes" != missing ] && [ "$changes" -ge 1 ] || { echo "no path-MTU change counted"; return 1; }
    [ "$answers" -ge 1 ] || { echo "no ICMP too-big answer counted"; return 1; }
    grep -q "path MTU reported by the kernel.*path_mtu=$NARROW_MTU" "$TMP/$1.log" || {
        echo "no log line with path_mtu=$NARROW_MTU"; grep -i "mtu" "$TMP/$1.log" | tail -5; return 1; }
    # Once per change: as many log lines as counted changes.
    local lines
    lines=$(grep -c "path MTU reported by the kernel" "$TMP/$1.log")
    [ "$lines" -eq "$changes" ] || { echo "$lines log lines for $changes changes"; return 1; }
}

a_to_b() {
    forget_path_mtus
    transfer "$NS_A" "$NS_B" 100.64.0.2 8000000 "A to B over IPv4 (ICMP from the router)"
}
check "TCP A to B crosses the narrow link (the router's ICMP, then ours to the TCP)" a_to_b
check "A counted the path MTU ($NARROW_MTU) and its ICMP answers, and logged the change once" counted a

b_to_a() {
    forget_path_mtus
    transfer "$NS_B" "$NS_A" 100.64.0.1 8000000 "B to A over IPv4 (B's own link is narrow)"
}
check "TCP B to A: B's own narrow link refuses the datagrams, B answers with ICMP" b_to_a
check "B counted the path MTU ($NARROW_MTU) and its ICMP answers" counted b

v6_inner() {
    local before after
    before=$(counter a icmp_too_big_written) || return 1
    transfer "$NS_A" "$NS_B" fd7a:115c:a1e0::2 8000000 "A to B over the IPv6 tunnel address (ICMPv6 packet too big)" || return 1
    after=$(counter a icmp_too_big_written) || return 1
    echo "node a: icmp_too_big_written $before before, $after after" >&3
    [ "$after" -gt "$before" ] || { echo "no ICMPv6 answer written"; return 1; }
}
check "TCP over the tunnel's IPv6 addresses crosses it too (ICMPv6 packet too big)" v6_inner

plain_path() {
    stop a
    stop b
    : >"$TMP/a.log"
    start "$NS_A" a WGMESH_FASTPATH=0 || return 1
    start "$NS_B" b WGMESH_FASTPATH=0 || return 1
    tunnel_up || return 1
    forget_path_mtus
    transfer "$NS_A" "$NS_B" 100.64.0.2 4000000 "A to B, plain data plane" || return 1
    counted a || return 1
}
check "the plain data plane (WGMESH_FASTPATH=0) acts on the path MTU too" plain_path

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
if [ "$FAILED" -gt 0 ]; then
    for n in a b; do echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-30}" "$TMP/$n.log"; done
    exit 1
fi
