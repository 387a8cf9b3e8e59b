#!/usr/bin/env bash
# End-to-end test of NAT traversal run by the coordination server: endpoint
# discovery (STUN), hole punching (call-me-maybe over the relay) and the TURN
# relay (coturn) as the fallback, with every NAT setting issued by
# wgmesh-control: the STUN servers and each node's time-limited TURN
# credentials (the shared secret is the server's alone), and each node's
# relayed address pushed to its peers as their relay candidate.
#
# The rig, every namespace and address made here and deleted on exit:
#   wgm-nat-inet   "the internet": a bridge at 198.51.100.1/24, coturn
#                  (STUN + TURN, REST-API shared secret) and wgmesh-control
#                  (HTTP on :8080) on it
#   wgm-nat-ra/rb  home routers: WAN 198.51.100.2 / .3 on that bridge, LAN
#                  10.201.0.1 / 10.202.0.1, NAT with nftables `masquerade`
#                  (endpoint-independent mapping; conntrack filters by
#                  address and port); router B later `masquerade fully-random`
#                  (a new mapping per destination: a symmetric NAT)
#   wgm-nat-a/b    a wgmeshd node behind each router (10.201.0.2, 10.202.0.2)
# The nodes' configs hold only [interface] and [control].
# Also measured (printed, not asserted): TCP throughput both ways over the
# direct path and over the relay, and the loss while the direct path is cut.
# Needs root, iproute2, nftables and coturn. Every wait is bounded.
# Usage: adapters/tests/e2e-nat.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
CONTROL=$(realpath "$BIN/wgmesh-control")
TRAFFIC=$(realpath "$(dirname "$0")/e2e_traffic.py")
NS_INET=wgm-nat-inet
NS_RA=wgm-nat-ra
NS_RB=wgm-nat-rb
NS_A=wgm-nat-a
NS_B=wgm-nat-b
ALL_NS=("$NS_A" "$NS_B" "$NS_RA" "$NS_RB" "$NS_INET")
SERVER=198.51.100.1
# The relay secret and auth keys are written to files: everything private.
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
start_turn() { # config
    ip netns exec "$NS_INET" turnserver -c "$1" >>"$TMP/turnserver.out" 2>&1 &
    PIDS+=($!)
    TURN_PID=$!
    for _ in $(seq 50); do
        ip netns exec "$NS_INET" ss -Hlnu "sport = :3478" 2>/dev/null | grep -q "$SERVER" && return 0
        sleep 0.1
    done
}
stop_turn() {
    kill -TERM "$TURN_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$TURN_PID" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$TURN_PID" 2>/dev/null || true
}
start_turn "$TMP/turnserver.conf"


# The control server issues the NAT settings: STUN on coturn, TURN on
# coturn with the shared secret only it and coturn know.
printf '%s\n' "$SECRET" >"$TMP/turn.secret"
cat >"$TMP/policy.toml" <<'POLICY'
[[acls]]
action = "accept"
src = ["*"]
dst = ["*:*"]
POLICY
ADMIN=(--admin-socket "$TMP/admin.sock")
SERVER_KEY=$("$CONTROL" key show --key-file "$TMP/server.key")
ip netns exec "$NS_INET" env RUST_LOG="${E2E_LOG:-info}" "$CONTROL" "${ADMIN[@]}" serve \
    --listen "$SERVER:8080" --db "sqlite:$TMP/control.db" --policy "$TMP/policy.toml" \
    --key-file "$TMP/server.key" --tailnet-name nat.e2e --keepalive-secs 5 \
    --stun-server "$SERVER:3478" --turn-server "$SERVER:3478" \
    --turn-secret-file "$TMP/turn.secret" --turn-credential-ttl 1h \
    >"$TMP/control.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    [ -S "$TMP/admin.sock" ] && ip netns exec "$NS_INET" ss -Hltn "sport = :8080" | grep -q LISTEN && break
    sleep 0.1
done

write_config() { # n port
    local auth
    auth=$("$CONTROL" "${ADMIN[@]}" authkey create) || return 1
    cat <<CONF
[interface]
name = "wgm$1"
listen_port = $2
mtu = 1280

[dns]
mode = "off"

[control]
url = "http://$SERVER:8080"
server_public_key = "$SERVER_KEY"
auth_key = "$auth"
state_dir = "$TMP/node-$1"
hostname = "node-${1,,}"
CONF
}
write_config A 51820 >"$TMP/a.toml"
write_config B 51820 >"$TMP/b.toml"

start() { # ns n
    local ns=$1 n=$2
    mkdir -p "$TMP/state-$n"
    ip netns exec "$ns" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" --no-uapi >>"$TMP/$n.log" 2>&1 &
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
# "relay" (its relayed address), "addr" (its tailnet IPv4), "path" (its
# peer's endpoint, "relay ADDR" when relayed), "peer_relay" (its peer's
# relayed address as control pushed it).
field() {
    api "$1" status --json >"$TMP/st-$1.json" 2>/dev/null || return 1
    python3 - "$TMP/st-$1.json" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
what = sys.argv[2]
if what == "stun":
    out = [e.split(" ")[0] for e in s.get("endpoints", []) if e.endswith("(stun)")]
    print(out[0] if out else "")
elif what == "relay":
    print(s.get("relay") or "")
elif what == "addr":
    v4 = [a.split("/")[0] for a in s.get("local_addrs", []) if ":" not in a]
    print(v4[0] if v4 else "")
elif what == "path":
    p = s["peers"][0] if s.get("peers") else {}
    ep = p.get("endpoint") or "-"
    print(("relay " + ep) if p.get("via_relay") else ep)
elif what == "peer_relay":
    p = s["peers"][0] if s.get("peers") else {}
    print(p.get("relay") or "")
PY
}
wait_field() { # n what [tries of 0.1 s]: until non-empty
    local v
    for _ in $(seq "${3:-100}"); do
        v=$(field "$1" "$2" || true)
        [ -n "$v" ] && { echo "$v"; return 0; }
        sleep 0.1
    done
    return 1
}
# wait_equal n what value [tries of 0.1 s]
wait_equal() {
    local v
    for _ in $(seq "${4:-200}"); do
        v=$(field "$1" "$2" || true)
        [ "$v" = "$3" ] && return 0
        sleep 0.1
    done
    echo "node $1 $2 is '$v', not '$3'"
    return 1
}

start "$NS_A" a
start "$NS_B" b

no_nat_settings_in_the_nodes_configs() {
    ! grep -qE "^\[(nat|relay)\]|secret" "$TMP/a.toml" "$TMP/b.toml" || return 1
    # A node-local [relay] next to [control] is refused: the secret stays
    # on the server.
    { cat "$TMP/a.toml"; printf '\n[relay]\nturn_server = "%s:3478"\nshared_secret = "x"\n' "$SERVER"; } >"$TMP/mixed.toml"
    if "$WGMESHD" --check --config "$TMP/mixed.toml" 2>"$TMP/err"; then echo "accepted"; return 1; fi
    cat "$TMP/err"
    grep -q "relay: with \[control\]" "$TMP/err" || return 1
}
check "the nodes' configs hold no NAT settings; a node-local [relay] with [control] is refused" no_nat_settings_in_the_nodes_configs

# 1. STUN, with the servers control named, finds each NAT's outside address.
stun_found() {
    local a b
    a=$(wait_field a stun 150) || { echo "A found no reflexive endpoint"; api a status; return 1; }
    b=$(wait_field b stun 150) || { echo "B found no reflexive endpoint"; api b status; return 1; }
    [ "${a%:*}" = 198.51.100.2 ] || { echo "A's reflexive endpoint $a is not router A's"; return 1; }
    [ "${b%:*}" = 198.51.100.3 ] || { echo "B's reflexive endpoint $b is not router B's"; return 1; }
    echo "A is $a outside, B is $b" >&3
}
check "STUN (servers from control) finds each node's NAT address" stun_found

# 2. Each node allocates on coturn with the credentials control issued.
relay_held() {
    local ra rb
    ra=$(wait_field a relay 150) || { echo "A holds no allocation"; tail -20 "$TMP/a.log"; return 1; }
    rb=$(wait_field b relay 150) || { echo "B holds no allocation"; tail -20 "$TMP/b.log"; return 1; }
    # The REST-API username `expiry:node`, from control; the secret itself
    # never reaches a node.
    grep -qE 'relay credentials from control applied .*username: "[0-9]{10}:node-a"' "$TMP/a.log" || { echo "no control-issued credentials in A's log"; return 1; }
    ! grep -qF "$SECRET" "$TMP/a.log" "$TMP/b.log" "$TMP/a.toml" "$TMP/b.toml" || { echo "the TURN secret reached a node"; return 1; }
    echo "A relayed at $ra, B at $rb" >&3
}
check "each node holds a TURN allocation with control-issued credentials" relay_held

# 3. Control pushes each node's relayed address to the other.
relays_pushed() {
    local ra rb
    ra=$(field a relay) && rb=$(field b relay) || return 1
    # Endpoints are re-read every 10 s: the relayed address follows.
    wait_equal a peer_relay "$rb" 250 || return 1
    wait_equal b peer_relay "$ra" 250 || return 1
}
check "control pushes each node's relayed address to its peer (status peer relay)" relays_pushed

ADDR_A=$(field a addr); ADDR_B=$(field b addr)
echo "     tailnet addresses: A=$ADDR_A B=$ADDR_B"

# 4. Two endpoint-independent NATs: hole punching gives a direct path.
direct_path() {
    local b_out t0 t1 path
    b_out=$(field b stun)
    t0=$(date +%s.%N)
    ip netns exec "$NS_A" ping -c 1 -W 5 "$ADDR_B" >/dev/null 2>&1 || true
    for _ in $(seq 300); do
        path=$(field a path || true)
        if [ "$path" = "$b_out" ]; then
            t1=$(date +%s.%N)
            echo "direct path $path $(python3 -c "print(f'{$t1 - $t0:.3f}')") s after the first packet" >&3
            break
        fi
        sleep 0.05
    done
    [ "$path" = "$b_out" ] || { echo "A's path to B is '$path', not $b_out"; api a status; return 1; }
    ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 "$ADDR_B" || return 1
}
check "endpoint-independent NATs: hole punching reaches a direct path" direct_path
show_path() { # n peer-out: the peer's line in status shows the direct address
    api "$1" status >"$TMP/status-$1" || return 1
    cat "$TMP/status-$1"
    grep "node-" "$TMP/status-$1" | grep -q " $2 " || return 1
    ! grep "node-" "$TMP/status-$1" | grep -q " relay " || return 1
}
check "wgmesh status shows the direct address" show_path a "$(field b stun)"
disco_ping_says() { # n ip want: "direct ADDR" or "relay"
    local out
    out=$(api "$1" ping --disco "$2" 2>&1) || { echo "$out"; return 1; }
    echo "$out"
    case "$3" in
        relay) echo "$out" | grep -qE "^pong from .* via relay [0-9.]+:[0-9]+ in" || return 1 ;;
        *) echo "$out" | grep -qE "^pong from .* via ${3#direct } in" || return 1 ;;
    esac
}
check "wgmesh ping --disco says the direct address answered" disco_ping_says a "$ADDR_B" "direct $(field b stun)"

# TCP throughput, both ways, printed (no timing assertion).
BLOB_MB=${E2E_NAT_MB:-50}
head -c $((BLOB_MB * 1000000)) /dev/urandom >"$TMP/blob"
WANT=$(sha256sum "$TMP/blob" | cut -d' ' -f1)
transfer() { # from-ns to-ns to-addr label: BLOB over TCP, sha256 checked, Mbit/s printed
    local from=$1 to=$2 addr=$3 label=$4 t0 t1 recv
    rm -f "$TMP/ready" "$TMP/got"
    ip netns exec "$to" timeout 120 python3 "$TRAFFIC" tcp-recv "$addr" 5201 "$TMP/got" "$TMP/ready" &
    recv=$!
    for _ in $(seq 50); do [ -e "$TMP/ready" ] && break; sleep 0.1; done
    t0=$(date +%s.%N)
    ip netns exec "$from" timeout 120 python3 "$TRAFFIC" tcp-send "$addr" 5201 "$TMP/blob" || { kill "$recv" 2>/dev/null; return 1; }
    wait "$recv" || return 1
    t1=$(date +%s.%N)
    [ "$(cut -d' ' -f1 "$TMP/got")" = "$WANT" ] || { echo "checksum differs: $(cat "$TMP/got") vs $WANT"; return 1; }
    echo "$label: $BLOB_MB MB in $(python3 -c "print(f'{$t1 - $t0:.2f} s = {$BLOB_MB * 8 / ($t1 - $t0):.0f} Mbit/s')"), sha256 matches" >&3
}
throughput_direct() {
    transfer "$NS_A" "$NS_B" "$ADDR_B" "direct A->B" || return 1
    transfer "$NS_B" "$NS_A" "$ADDR_A" "direct B->A" || return 1
    case "$(field a path)" in relay*) echo "the transfer left the direct path"; return 1 ;; esac
}
check "TCP over the direct path, both ways (throughput printed)" throughput_direct

# Cutting the direct path (router A drops what goes to router B) moves the
# traffic to the relay within the trust timeout; healing it moves it back.
cut_direct() {
    ip netns exec "$NS_RA" nft add table ip wgmcut || return 1
    ip netns exec "$NS_RA" nft "add chain ip wgmcut cut { type filter hook forward priority 0; policy accept; }" || return 1
    ip netns exec "$NS_RA" nft add rule ip wgmcut cut ip daddr 198.51.100.3 drop || return 1
}
heal_direct() { ip netns exec "$NS_RA" nft delete table ip wgmcut; }
failover() {
    local path lost t0 t1
    cut_direct || return 1
    t0=$(date +%s.%N)
    # One ping every 200 ms for 15 s while the path moves.
    ip netns exec "$NS_A" ping -c 75 -i 0.2 -W 1 "$ADDR_B" >"$TMP/failover-ping" 2>&1 &
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
}
check "a cut direct path moves to the relay (loss printed)" failover
check "wgmesh ping --disco says the relay answered while the direct path is cut" disco_ping_says a "$ADDR_B" relay
throughput_relay() {
    transfer "$NS_A" "$NS_B" "$ADDR_B" "relay A->B" || return 1
    transfer "$NS_B" "$NS_A" "$ADDR_A" "relay B->A" || return 1
    case "$(field a path)" in relay*) ;; *) echo "the transfer did not stay on the relay"; return 1 ;; esac
}
check "TCP over the relay, both ways (throughput printed)" throughput_relay
heal() {
    local b_out t0 t1 path pinger
    b_out=$(field b stun)
    heal_direct || return 1
    t0=$(date +%s.%N)
    ip netns exec "$NS_A" ping -c 100 -i 0.2 -W 1 "$ADDR_B" >/dev/null 2>&1 &
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
check "a healed direct path is used again" heal

# 5. A symmetric NAT at B: a new mapping per destination. B restarts on
# another port (new conntrack entries, so the new NAT applies to them).
nat "$NS_RB" "fully-random"
stop b
sed -i 's/^listen_port = .*/listen_port = 51821/' "$TMP/b.toml"
start "$NS_B" b
symmetric_ready() {
    local rb
    wait_field b stun 150 >/dev/null || { echo "B found no reflexive endpoint"; return 1; }
    rb=$(wait_field b relay 150) || { echo "B holds no allocation"; return 1; }
    wait_equal a peer_relay "$rb" 250 || return 1
}
check "behind the symmetric NAT B allocates again and A learns B's new relay from control" symmetric_ready

relay_path() {
    local path ok=0
    ip netns exec "$NS_A" ping -c 1 -W 5 "$ADDR_B" >/dev/null 2>&1 || true
    for _ in $(seq 300); do
        path=$(field a path || true)
        case "$path" in relay*) break ;; esac
        sleep 0.05
    done
    case "$path" in relay*) ;; *) echo "A's path to B is '$path', not the relay"; api a status; return 1 ;; esac
    for _ in $(seq 15); do
        if ip netns exec "$NS_A" ping -c 1 -W 1 "$ADDR_B" >/dev/null 2>&1; then ok=1; break; fi
    done
    [ "$ok" = 1 ] || { echo "no ping answered over the relay"; return 1; }
    ip netns exec "$NS_A" ping -c 3 -i 0.2 -W 2 "$ADDR_B" || return 1
    api a status | grep -q "relay" || return 1
    echo "A's path: $path; B's path: $(field b path)" >&3
}
check "symmetric NAT: the nodes fall back to the relay (status says relay)" relay_path
tcp_over_relay() {
    transfer "$NS_A" "$NS_B" "$ADDR_B" "symmetric NAT, relay A->B"
}
check "symmetric NAT: TCP transfer over the relay arrives intact (sha256)" tcp_over_relay

# 6. Credentials the TURN server rejects: coturn restarts with another
# secret, so control's credentials fail with 401. B (restarted) counts and
# logs the rejection and reopens its map stream for fresh credentials; once
# coturn has the right secret again, B holds an allocation again with no
# restart or config change.
sed "s/^static-auth-secret=.*/static-auth-secret=not-the-control-servers/" "$TMP/turnserver.conf" >"$TMP/turnserver-wrong.conf"
rejected_then_refetched() {
    stop_turn
    start_turn "$TMP/turnserver-wrong.conf" || return 1
    stop b
    start "$NS_B" b || return 1
    # The second 401 (after the challenge) ends the attempt at once; the
    # control client sees it on its next 10 s check. Bounded at 70 s.
    for _ in $(seq 700); do
        grep -q "reopening the stream for fresh ones" "$TMP/b.log" && break
        sleep 0.1
    done
    grep -E "TURN allocation refused.*credentials rejected" "$TMP/b.log" | tail -1 || { echo "no rejection logged"; return 1; }
    grep "reopening the stream for fresh ones" "$TMP/b.log" | tail -1 || { echo "no re-fetch"; return 1; }
    [ -z "$(field b relay)" ] || { echo "B holds an allocation coturn should refuse"; return 1; }
    stop_turn
    start_turn "$TMP/turnserver.conf" || return 1
    local t0 t1 rb
    t0=$(date +%s.%N)
    rb=$(wait_field b relay 400) || { echo "B holds no allocation after coturn got the right secret back"; return 1; }
    t1=$(date +%s.%N)
    echo "credentials rejected, re-fetched; allocation $rb $(python3 -c "print(f'{$t1 - $t0:.1f}')") s after coturn got the right secret back" >&3
}
check "credentials the TURN server rejects (401) are counted, logged and fetched again from control" rejected_then_refetched

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
if [ "$FAILED" -gt 0 ]; then
    for n in a b; do echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-30}" "$TMP/$n.log"; done
    echo "--- wgmesh-control log (tail)"; tail -n 20 "$TMP/control.log" 2>/dev/null || true
    echo "--- turnserver log (tail)"; tail -n 20 "$TMP/turnserver.log" 2>/dev/null || true
    exit 1
fi
