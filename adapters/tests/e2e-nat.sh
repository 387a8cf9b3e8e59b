#!/usr/bin/env bash
# End-to-end test of NAT traversal: endpoint discovery (STUN), hole punching
# (call-me-maybe over the relay) and the TURN relay (coturn) as the fallback.
#
# The rig, every namespace and address made here and deleted on exit:
#   wgm-nat-inet   "the internet": a bridge at 198.51.100.1/24 and coturn
#                  (STUN + TURN, REST-API shared secret) on it
#   wgm-nat-ra/rb  home routers: WAN 198.51.100.2 / .3 on that bridge, LAN
#                  10.201.0.1 / 10.202.0.1, NAT with nftables `masquerade`
#                  (endpoint-independent mapping; conntrack filters by
#                  address and port); router B later `masquerade fully-random`
#                  (a new mapping per destination: a symmetric NAT)
#   wgm-nat-a/b    a wgmeshd node behind each router (10.201.0.2, 10.202.0.2)
# The suite plays the control server: it reads each node's endpoints and
# relayed address from `wgmesh status --json` and writes them into the other
# node's config (reload).
# Needs root, iproute2, nftables and coturn. Every wait is bounded.
# Usage: adapters/tests/e2e-nat.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
TRAFFIC=$(realpath "$(dirname "$0")/e2e_traffic.py")
NS_INET=wgm-nat-inet
NS_RA=wgm-nat-ra
NS_RB=wgm-nat-rb
NS_A=wgm-nat-a
NS_B=wgm-nat-b
ALL_NS=("$NS_A" "$NS_B" "$NS_RA" "$NS_RB" "$NS_INET")
SERVER=198.51.100.1
# Configs hold keys and the relay secret inline: everything written is private.
umask 077
PASSED=0
FAILED=0
SKIPPED=0
PIDS=()
declare -A PID

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    echo "e2e-nat: needs root and iproute2; skipping"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi
for tool in nft turnserver; do
    if ! command -v "$tool" >/dev/null; then
        echo "e2e-nat: $tool is not installed (Debian: nftables, coturn; .ci/run installs them); skipping"
        echo "0 passed, 0 failed, 1 skipped"
        exit 0
    fi
done
TMP=$(mktemp -d /tmp/wgmesh-e2e-nat.XXXXXX)

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
ip -n "$NS_INET" link add br0 type bridge
ip -n "$NS_INET" addr add "$SERVER/24" dev br0
ip -n "$NS_INET" link set br0 up
router() { # ns wan-octet lan-prefix: a router on the bridge with a LAN veth to its node
    local ns=$1 octet=$2 lan=$3 node=$4 tag=$5
    ip link add "wan" netns "$ns" type veth peer name "p-$tag" netns "$NS_INET"
    ip -n "$NS_INET" link set "p-$tag" master br0 up
    ip -n "$ns" addr add "198.51.100.$octet/24" dev wan
    ip -n "$ns" link set wan up
    ip link add "lan" netns "$ns" type veth peer name "eth0" netns "$node"
    ip -n "$ns" addr add "$lan.1/24" dev lan
    ip -n "$ns" link set lan up
    ip -n "$node" addr add "$lan.2/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" route add default via "$lan.1"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
}
router "$NS_RA" 2 10.201.0 "$NS_A" a
router "$NS_RB" 3 10.202.0 "$NS_B" b
# The router drops what arrives unasked on its WAN side (as home routers
# do): besides being realistic, this matters to hole punching on Linux. A
# datagram accepted there would leave a conntrack entry for its 5-tuple,
# and the node's own first datagram back to that sender would then get
# another source port from masquerade (the tuple is taken), which the
# sender's NAT drops.
nat() { # ns masquerade-flags: the router's NAT, replacing any before
    ip netns exec "$1" nft -f - <<NFT
table ip wgmnat
delete table ip wgmnat
table ip wgmnat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade $2
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state new drop
    }
}
NFT
}
nat "$NS_RA" ""
nat "$NS_RB" ""

# coturn: STUN and TURN on the internet's address, credentials from the
# shared secret (TURN REST API), relay ports in a small range.
SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
cat >"$TMP/turnserver.conf" <<CONF
listening-ip=$SERVER
relay-ip=$SERVER
listening-port=3478
min-port=49152
max-port=49252
use-auth-secret
static-auth-secret=$SECRET
realm=wgmesh.e2e
fingerprint
no-tcp
no-tls
no-dtls
no-tcp-relay
no-cli
no-multicast-peers
simple-log
log-file=$TMP/turnserver.log
pidfile=$TMP/turnserver.pid
CONF
ip netns exec "$NS_INET" turnserver -c "$TMP/turnserver.conf" >"$TMP/turnserver.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
    ip netns exec "$NS_INET" ss -Hlnu "sport = :3478" 2>/dev/null | grep -q "$SERVER" && break
    sleep 0.1
done

KEY_A=$("$WGMESH" genkey); PUB_A=$(echo "$KEY_A" | "$WGMESH" pubkey)
KEY_B=$("$WGMESH" genkey); PUB_B=$(echo "$KEY_B" | "$WGMESH" pubkey)
DISCO_A=$("$WGMESH" genkey); DPUB_A=$(echo "$DISCO_A" | "$WGMESH" pubkey)
DISCO_B=$("$WGMESH" genkey); DPUB_B=$(echo "$DISCO_B" | "$WGMESH" pubkey)

# write_config n key disco ip port peer-name peer-pub peer-disco peer-ip [endpoints-toml relay]
write_config() {
    cat <<CONF
[interface]
name = "wgm$1"
private_key = "$2"
disco_private_key = "$3"
listen_port = $5
addresses = ["$4/32"]
mtu = 1280

[dns]
mode = "off"

[nat]
stun_servers = ["$SERVER:3478"]

[relay]
turn_server = "$SERVER:3478"
shared_secret = "$SECRET"
credential_ttl_secs = 3600

[[peer]]
name = "$6"
public_key = "$7"
disco_key = "$8"
allowed_ips = ["$9/32"]
endpoints = [${10:-}]
CONF
    if [ -n "${11:-}" ]; then echo "relay_endpoint = \"${11}\""; fi
}
write_config A "$KEY_A" "$DISCO_A" 100.64.0.1 51820 node-b "$PUB_B" "$DPUB_B" 100.64.0.2 >"$TMP/a.toml"
write_config B "$KEY_B" "$DISCO_B" 100.64.0.2 51820 node-a "$PUB_A" "$DPUB_A" 100.64.0.1 >"$TMP/b.toml"

start() { # ns n
    local ns=$1 n=$2
    mkdir -p "$TMP/state-$n"
    ip netns exec "$ns" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" >"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
    PID[$n]=$!
    for _ in $(seq 100); do [ -S "$TMP/state-$n/wgm${n^^}.sock" ] && return 0; sleep 0.1; done
    echo "wgmeshd $n did not start"; cat "$TMP/$n.log"; return 1
}
stop() { # n
    local pid=${PID[$1]}
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
api() { local n=$1; shift; "$WGMESH" --socket "$TMP/state-$n/wgm${n^^}.sock" "$@"; }

# field n what: from node n's status: "stun" (its reflexive endpoint),
# "endpoints" (all, as TOML strings), "relay" (its relayed address), "path"
# (its peer's endpoint, "relay ADDR" when relayed).
field() {
    api "$1" status --json >"$TMP/st-$1.json" 2>/dev/null || return 1
    python3 - "$TMP/st-$1.json" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
what = sys.argv[2]
eps = [e.split(" ")[0] for e in s.get("endpoints", [])]
if what == "stun":
    out = [e.split(" ")[0] for e in s.get("endpoints", []) if e.endswith("(stun)")]
    print(out[0] if out else "")
elif what == "endpoints":
    print(", ".join('"%s"' % e for e in eps))
elif what == "relay":
    print(s.get("relay") or "")
elif what == "path":
    p = s["peers"][0]
    ep = p.get("endpoint") or "-"
    print(("relay " + ep) if p.get("via_relay") else ep)
PY
}
wait_field() { # n what: until non-empty (10 s)
    local v
    for _ in $(seq 100); do
        v=$(field "$1" "$2" || true)
        [ -n "$v" ] && { echo "$v"; return 0; }
        sleep 0.1
    done
    return 1
}
# introduce: each node gets the other's endpoints and relayed address (what
# control would push), then reloads.
introduce() {
    local ea eb ra rb
    ea=$(field a endpoints) || return 1
    eb=$(field b endpoints) || return 1
    ra=$(wait_field a relay) || { echo "A holds no relay allocation"; tail -20 "$TMP/a.log"; return 1; }
    rb=$(wait_field b relay) || { echo "B holds no relay allocation"; tail -20 "$TMP/b.log"; return 1; }
    write_config A "$KEY_A" "$DISCO_A" 100.64.0.1 "$PORT_A" node-b "$PUB_B" "$DPUB_B" 100.64.0.2 "$eb" "$rb" >"$TMP/a.toml"
    write_config B "$KEY_B" "$DISCO_B" 100.64.0.2 "$PORT_B" node-a "$PUB_A" "$DPUB_A" 100.64.0.1 "$ea" "$ra" >"$TMP/b.toml"
    api a reload >/dev/null || return 1
    api b reload >/dev/null || return 1
    echo "A endpoints $ea relay $ra" >&3
    echo "B endpoints $eb relay $rb" >&3
}

PORT_A=51820
PORT_B=51820
start "$NS_A" a
start "$NS_B" b

# 1. STUN on the WireGuard socket finds the NAT's outside address.
stun_found() {
    local a b
    a=$(wait_field a stun) || { echo "A found no reflexive endpoint"; api a status; return 1; }
    b=$(wait_field b stun) || { echo "B found no reflexive endpoint"; api b status; return 1; }
    [ "${a%:*}" = 198.51.100.2 ] || { echo "A's reflexive endpoint $a is not router A's"; return 1; }
    [ "${b%:*}" = 198.51.100.3 ] || { echo "B's reflexive endpoint $b is not router B's"; return 1; }
    echo "A is $a outside, B is $b" >&3
}
check "STUN finds each node's NAT address (status endpoints: local + stun)" stun_found

# 2. Each node holds a TURN allocation (REST-API credentials from the secret).
relay_held() {
    wait_field a relay >/dev/null || { echo "A holds no allocation"; tail -20 "$TMP/a.log"; return 1; }
    wait_field b relay >/dev/null || { echo "B holds no allocation"; tail -20 "$TMP/b.log"; return 1; }
}
check "each node holds a TURN allocation on coturn (status shows its relayed address)" relay_held
check "the suite, as control, hands each node the other's endpoints and relay" introduce

# 3. Two endpoint-independent NATs: hole punching gives a direct path.
direct_path() {
    local b_out t0 t1 path
    b_out=$(field b stun)
    t0=$(date +%s.%N)
    ip netns exec "$NS_A" ping -c 1 -W 5 100.64.0.2 >/dev/null 2>&1 || true
    for _ in $(seq 200); do
        path=$(field a path || true)
        if [ "$path" = "$b_out" ]; then
            t1=$(date +%s.%N)
            echo "direct path $path $(python3 -c "print(f'{$t1 - $t0:.3f}')") s after the first packet" >&3
            break
        fi
        sleep 0.05
    done
    [ "$path" = "$b_out" ] || { echo "A's path to B is '$path', not $b_out"; api a status; return 1; }
    ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 100.64.0.2 || return 1
}
check "endpoint-independent NATs: hole punching reaches a direct path" direct_path
show_path() { # n peer-out: the peer's line in status shows the direct address
    api "$1" status >"$TMP/status-$1" || return 1
    cat "$TMP/status-$1"
    grep "node-" "$TMP/status-$1" | grep -q " $2 " || return 1
    ! grep "node-" "$TMP/status-$1" | grep -q " relay " || return 1
}
check "wgmesh status shows the direct address" show_path a "$(field b stun)"

# Cutting the direct path (router A drops what goes to router B) moves the
# traffic to the relay within the trust timeout; healing it moves it back.
failover() {
    local b_out path lost t0 t1
    b_out=$(field b stun)
    ip netns exec "$NS_RA" nft add table ip wgmcut || return 1
    ip netns exec "$NS_RA" nft "add chain ip wgmcut cut { type filter hook forward priority 0; policy accept; }" || return 1
    ip netns exec "$NS_RA" nft add rule ip wgmcut cut ip daddr 198.51.100.3 drop || return 1
    t0=$(date +%s.%N)
    # One ping every 200 ms for 15 s while the path moves.
    ip netns exec "$NS_A" ping -c 75 -i 0.2 -W 1 100.64.0.2 >"$TMP/failover-ping" 2>&1 &
    local pinger=$!
    for _ in $(seq 300); do
        path=$(field a path || true)
        case "$path" in relay*) break ;; esac
        sleep 0.05
    done
    t1=$(date +%s.%N)
    wait "$pinger" || true
    lost=$(grep -o "[0-9.]*% packet loss" "$TMP/failover-ping" || echo "?")
    case "$path" in relay*) ;; *) echo "A's path is '$path' after the cut, not the relay"; return 1 ;; esac
    echo "direct path cut: relay after $(python3 -c "print(f'{$t1 - $t0:.2f}')") s; $lost over 75 pings 200 ms apart" >&3
    ip netns exec "$NS_RA" nft delete table ip wgmcut || return 1
    t0=$(date +%s.%N)
    ip netns exec "$NS_A" ping -c 100 -i 0.2 -W 1 100.64.0.2 >/dev/null 2>&1 &
    pinger=$!
    for _ in $(seq 400); do
        path=$(field a path || true)
        [ "$path" = "$b_out" ] && break
        sleep 0.05
    done
    t1=$(date +%s.%N)
    kill "$pinger" 2>/dev/null; wait "$pinger" 2>/dev/null || true
    [ "$path" = "$b_out" ] || { echo "A's path is '$path' after healing, not $b_out"; return 1; }
    echo "direct path back $(python3 -c "print(f'{$t1 - $t0:.2f}')") s after healing" >&3
}
check "a cut direct path moves to the relay and back when healed" failover

# 4. A symmetric NAT at B: a new mapping per destination. B restarts on
# another port (new conntrack entries, so the new NAT applies to them).
nat "$NS_RB" "fully-random"
stop b
PORT_B=51821
write_config B "$KEY_B" "$DISCO_B" 100.64.0.2 "$PORT_B" node-a "$PUB_A" "$DPUB_A" 100.64.0.1 >"$TMP/b.toml"
start "$NS_B" b
symmetric_ready() {
    wait_field b stun >/dev/null || { echo "B found no reflexive endpoint"; return 1; }
    introduce
}
check "behind the symmetric NAT B learns a new reflexive endpoint; both get B's new endpoints and relay" symmetric_ready

relay_path() {
    local path
    ip netns exec "$NS_A" ping -c 1 -W 5 100.64.0.2 >/dev/null 2>&1 || true
    for _ in $(seq 200); do
        path=$(field a path || true)
        case "$path" in relay*) break ;; esac
        sleep 0.05
    done
    case "$path" in relay*) ;; *) echo "A's path to B is '$path', not the relay"; api a status; return 1 ;; esac
    # B restarted with the same keys, so A's old session needs a handshake
    # retry first: traffic flows within 15 s.
    local ok=0
    for _ in $(seq 15); do
        if ip netns exec "$NS_A" ping -c 1 -W 1 100.64.0.2 >/dev/null 2>&1; then ok=1; break; fi
    done
    [ "$ok" = 1 ] || { echo "no ping answered over the relay"; return 1; }
    ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 100.64.0.2 || return 1
    api a status | grep -q "relay" || return 1
    api b status | grep -q "relay" || return 1
    echo "A's path: $path; B's path: $(field b path)" >&3
}
check "symmetric NAT: the nodes fall back to the relay (status says relay)" relay_path

tcp_over_relay() {
    head -c 2000000 /dev/urandom >"$TMP/blob"
    local want
    want=$(sha256sum "$TMP/blob" | cut -d' ' -f1)
    rm -f "$TMP/ready" "$TMP/got"
    ip netns exec "$NS_B" timeout 60 python3 "$TRAFFIC" tcp-recv 100.64.0.2 5201 "$TMP/got" "$TMP/ready" &
    local recv=$!
    for _ in $(seq 50); do [ -e "$TMP/ready" ] && break; sleep 0.1; done
    local t0 t1
    t0=$(date +%s.%N)
    ip netns exec "$NS_A" timeout 60 python3 "$TRAFFIC" tcp-send 100.64.0.2 5201 "$TMP/blob" || { kill "$recv" 2>/dev/null; return 1; }
    wait "$recv" || return 1
    t1=$(date +%s.%N)
    [ "$(cut -d' ' -f1 "$TMP/got")" = "$want" ] || { echo "checksum differs: $(cat "$TMP/got") vs $want"; return 1; }
    echo "2 MB over the relay in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s, sha256 matches" >&3
}
check "TCP transfer over the relay arrives intact (sha256)" tcp_over_relay

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
if [ "$FAILED" -gt 0 ]; then
    for n in a b; do echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-30}" "$TMP/$n.log"; done
    echo "--- turnserver log (tail)"; tail -n 20 "$TMP/turnserver.log" 2>/dev/null || true
    exit 1
fi
