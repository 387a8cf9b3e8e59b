#!/usr/bin/env bash
# End-to-end checks of the daemon's OS side (issue 15): health (OS failures
# shown by `wgmesh status`, `status --json` and the metrics endpoint), the
# link monitor (links down and up, an address change on the default
# interface), exit nodes and interop with the current upstream wireguard-go.
#
# Namespaces wgm-d15-* joined by veth pairs to a bridge in wgm-d15-br,
# whose 10.78.0.254 is every node's default gateway. Needs root and
# iproute2. Everything it creates it deletes on exit, also on failure.
# Every wait is bounded. Usage: adapters/tests/e2e-daemon.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
HERE=$(realpath "$(dirname "$0")")
NS_BR=wgm-d15-br
NS_A=wgm-d15-a
NS_B=wgm-d15-b
NS_C=wgm-d15-c
NS_NET=wgm-d15-net
ALL_NS=("$NS_A" "$NS_B" "$NS_C" "$NS_NET" "$NS_BR")
umask 077
TMP=$(mktemp -d /tmp/wgmesh-e2e-d15.XXXXXX)
PASSED=0
FAILED=0
SKIPPED=0
PIDS=()
declare -A PID

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    echo "e2e-daemon: needs root and iproute2; skipping"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    for n in A B C G; do rm -f "/var/run/wireguard/wgd15$n.sock"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap "exit 130" INT TERM

check() { # name function...; E2E_TRACE=1 traces each step into the output
    local name=$1 rc=0; shift
    [ -n "${E2E_TRACE:-}" ] && set -x
    "$@" >"$TMP/out" 2>&1 || rc=$?
    { set +x; } 2>/dev/null
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1)); echo "ok   $name"
    else
        FAILED=$((FAILED + 1)); echo "FAIL $name"; sed 's/^/     /' "$TMP/out" | tail -25
    fi
}
skip() { # name reason
    SKIPPED=$((SKIPPED + 1)); echo "skip $1 ($2)"
}

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
in_c() { ip netns exec "$NS_C" "$@"; }

for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
ip netns add "$NS_BR"
ip -n "$NS_BR" link add br0 type bridge
ip -n "$NS_BR" addr add 10.78.0.254/24 dev br0
ip -n "$NS_BR" link set br0 up
add_ns() { # x octet: namespace wgm-d15-x at 10.78.0.octet, default via .254
    local x=$1 ns="wgm-d15-$1"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "veth-$x" netns "$ns" type veth peer name "br-$x" netns "$NS_BR"
    ip -n "$NS_BR" link set "br-$x" master br0 up
    ip -n "$ns" addr add "10.78.0.$2/24" dev "veth-$x"
    ip -n "$ns" link set "veth-$x" up
    ip -n "$ns" route add default via 10.78.0.254
}
add_ns a 1
add_ns b 2
add_ns c 3

KEY_A=$("$WGMESH" genkey); PUB_A=$(echo "$KEY_A" | "$WGMESH" pubkey)
KEY_B=$("$WGMESH" genkey); PUB_B=$(echo "$KEY_B" | "$WGMESH" pubkey)
KEY_C=$("$WGMESH" genkey); PUB_C=$(echo "$KEY_C" | "$WGMESH" pubkey)

write_config() { # name key octet peer_name peer_pub peer_octet [extra peer allowed_ips]
    cat <<CONF
[interface]
name = "$1"
private_key = "$2"
listen_port = 51820
addresses = ["100.64.1.$3/32", "fd7a:115c:a1e0::1:$3/128"]
mtu = 1280

[dns]
mode = "resolv-conf"
nameservers = ["10.78.0.254"]
search_domains = ["d15.e2e"]

[api]
metrics_listen = "127.0.0.1:9115"

[[peer]]
name = "$4"
public_key = "$5"
endpoints = ["10.78.0.$6:51820"]
allowed_ips = ["100.64.1.$6/32", "fd7a:115c:a1e0::1:$6/128"${7:+, $7}]
CONF
}
write_config wgd15A "$KEY_A" 1 node-b "$PUB_B" 2 >"$TMP/a.toml"
# A's second peer is the foreign WireGuard of the interop checks, in C.
cat >>"$TMP/a.toml" <<CONF

[[peer]]
name = "node-g"
public_key = "$PUB_C"
endpoints = ["10.78.0.3:51820"]
allowed_ips = ["100.64.1.3/32"]
CONF
write_config wgd15B "$KEY_B" 2 node-a "$PUB_A" 1 >"$TMP/b.toml"
for n in a b c; do
    echo "nameserver 192.0.2.53" >"$TMP/resolv-$n.conf"
    mkdir -p "$TMP/state-$n"
done

start() { # ns name [command prefix...]: wgmeshd in the foreground, bounded wait for its API
    local ns=$1 n=$2; shift 2
    ip netns exec "$ns" "$@" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" --resolv-conf "$TMP/resolv-$n.conf" >"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
    PID[$n]=$!
    for _ in $(seq 100); do [ -S "$TMP/state-$n/wgd15${n^^}.sock" ] && return 0; sleep 0.1; done
    echo "wgmeshd $n did not start"; cat "$TMP/$n.log"; return 1
}
api() { # name args...: the CLI against node name's API socket
    local n=$1; shift
    "$WGMESH" --socket "$TMP/state-$n/wgd15${n^^}.sock" "$@"
}
json_field() { # name python-expression-on-s: a field of `status --json`
    api "$1" status --json | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)"
}
wait_for() { # tries command...: retries every 0.1 s
    local tries=$1; shift
    for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    "$@"
}

# --- Health -----------------------------------------------------------------

# A runs the batched data plane (the default, named here so that the
# interop checks below keep testing it if the default changes).
start "$NS_A" a env WGMESH_FASTPATH=1
# B runs in a mount namespace of its own where its resolv.conf is a
# read-only bind mount (root cannot write it either), and with IPv6 off
# for interfaces created from now on, so its tunnel refuses its IPv6
# address.
in_b sysctl -qw net.ipv6.conf.default.disable_ipv6=1
start "$NS_B" b unshare -m sh -c "mount --bind '$TMP/resolv-b.conf' '$TMP/resolv-b.conf' && mount -o remount,ro,bind '$TMP/resolv-b.conf' && exec \"\$@\"" sh

health_ok() {
    api a status | grep "^health: ok$" >/dev/null || { api a status; return 1; }
    [ "$(json_field a 's["health"]["state"]')" = ok ] || return 1
    [ "$(json_field a 'len(s["health"]["problems"])')" = 0 ] || return 1
    in_a python3 - <<'PY' || return 1
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9115/metrics", timeout=5).read().decode()
assert 'wgmesh_health_state{interface="wgd15A"} 0\n' in body, body
assert "wgmesh_health_problem{" not in body
PY
}
check "health: ok in status, status --json and the metrics endpoint when nothing failed" health_ok

dns_read_only() {
    local problem
    wait_for 50 sh -c "'$WGMESH' --socket '$TMP/state-b/wgd15B.sock' status --json | grep -q '\"dns\"'" || return 1
    api b status | tee "$TMP/status-b"
    grep -q "^health: error$" "$TMP/status-b" || return 1
    grep -Eq "^  dns error: .*resolv-b.conf.*Read-only file system.* since unix time [0-9]+ \([0-9]+s ago\)$" "$TMP/status-b" || return 1
    problem=$(json_field b '[p for p in s["health"]["problems"] if p["subsystem"] == "dns"][0]')
    echo "$problem"
    grep -q "'severity': 'error'" <<<"$problem" || return 1
    grep -q "'since_unix': [0-9]" <<<"$problem" || return 1
    # The file itself is untouched.
    grep -q "nameserver 192.0.2.53" "$TMP/resolv-b.conf" || return 1
}
check "health: a read-only resolv.conf is a DNS error with its reason and time" dns_read_only

address_refused() {
    wait_for 50 sh -c "'$WGMESH' --socket '$TMP/state-b/wgd15B.sock' status --json | grep -q '\"router\"'" || return 1
    api b status | tee "$TMP/status-b"
    grep -Eq "^  router error: add address fd7a:115c:a1e0::1:2/128.* since unix time" "$TMP/status-b" || return 1
    # The metrics endpoint says the same.
    in_b python3 - <<'PY' || return 1
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9115/metrics", timeout=5).read().decode()
print(body[:0])
assert 'wgmesh_health_state{interface="wgd15B"} 2\n' in body, body
assert 'wgmesh_health_problem{interface="wgd15B",subsystem="router",severity="error"} 1\n' in body, body
assert 'wgmesh_health_problem{interface="wgd15B",subsystem="dns",severity="error"} 1\n' in body, body
assert 'wgmesh_health_problem_seconds{interface="wgd15B",subsystem="dns"}' in body, body
PY
    [ "$(api b metrics | grep -c '^wgmesh_health_problem{')" = 2 ] || return 1
}
check "health: an address the kernel refuses is a router error (status and metrics)" address_refused

route_recovers() {
    # IPv6 back on B's tunnel, and a reload whose router part changed: the
    # address and routes go in and the problem is cleared; the DNS one stays.
    in_b sysctl -qw net.ipv6.conf.wgd15B.disable_ipv6=0 || return 1
    sed -i 's#"fd7a:115c:a1e0::1:1/128"\]#"fd7a:115c:a1e0::1:1/128", "10.99.0.0/24"]#' "$TMP/b.toml" || return 1
    api b reload || return 1
    wait_for 50 sh -c "! '$WGMESH' --socket '$TMP/state-b/wgd15B.sock' status --json | grep -q '\"router\"'" || return 1
    api b status | tee "$TMP/status-b"
    grep -q "^  dns error" "$TMP/status-b" || return 1
    # (grep without -q reads everything: under pipefail, one that stops
    # early fails the pipeline with the writer's SIGPIPE.)
    in_b ip -6 route show dev wgd15B | grep "fd7a:115c:a1e0::1:1" >/dev/null || return 1
    in_b ip route show dev wgd15B | grep "10.99.0.0/24" >/dev/null || return 1
    in_b ping -c 2 -i 0.2 -W 2 100.64.1.1 || return 1
    in_b ping -c 2 -i 0.2 -W 2 fd7a:115c:a1e0::1:1 || return 1
}
check "health: the router problem clears once the address and routes go in" route_recovers

socket_port_taken() {
    # Something else holds the port UAPI asks for: the old socket stays,
    # status shows a socket warning; a free port clears it.
    local before
    before=$(json_field a 's["listen_port"]')
    in_a /usr/bin/python3 -c "
import socket, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('::', 51999)); time.sleep(8)" &
    local holder=$!
    PIDS+=("$holder")
    wait_for 50 sh -c "ip netns exec '$NS_A' ss -Hlun 'sport = :51999' | grep -q 51999" || return 1
    in_a wg set wgd15A listen-port 51999 || return 1
    wait_for 30 sh -c "'$WGMESH' --socket '$TMP/state-a/wgd15A.sock' status | grep -q '^health: warning'" || { api a status; return 1; }
    api a status | tee "$TMP/status-a"
    grep -q "^  socket warning: rebind to port 51999 failed (kept port $before)" "$TMP/status-a" || return 1
    [ "$(json_field a 's["listen_port"]')" = "$before" ] || return 1
    in_a wg set wgd15A listen-port 51821 || return 1
    wait_for 30 sh -c "'$WGMESH' --socket '$TMP/state-a/wgd15A.sock' status | grep -q '^health: ok'" || return 1
    [ "$(json_field a 's["listen_port"]')" = 51821 ] || return 1
    kill "$holder" 2>/dev/null || true
    in_a wg set wgd15A listen-port 51820 || return 1
}
if command -v wg >/dev/null; then
    check "health: a listen port the kernel refuses is a socket warning until a rebind works" socket_port_taken
else
    skip "health: socket warning" "wg (wireguard-tools) not installed"
fi

tun_down() {
    # A's tunnel interface goes down while B sends to it: A's TUN writes
    # fail (EIO), which shows as a TUN error; up again, it clears.
    in_a ip link set wgd15A down || return 1
    in_b ping -c 5 -i 0.2 -W 1 100.64.1.1 >/dev/null 2>&1 || true
    wait_for 30 sh -c "'$WGMESH' --socket '$TMP/state-a/wgd15A.sock' status | grep -q '^  tun error: TUN write'" || { api a status; return 1; }
    api a status
    in_a ip link set wgd15A up || return 1
    # The kernel dropped the interface's routes when it went down; put
    # them back as the router had them.
    for route in 100.64.1.2/32 100.64.1.3/32 fd7a:115c:a1e0::1:2/128; do
        in_a ip route replace "$route" dev wgd15A || return 1
    done
    in_b ping -c 3 -i 0.2 -W 2 100.64.1.1 >/dev/null 2>&1 || true
    wait_for 50 sh -c "! '$WGMESH' --socket '$TMP/state-a/wgd15A.sock' status | grep -q '^  tun '" || return 1
    api a status
}
check "health: TUN writes that fail are a TUN error until they work again" tun_down

# --- Link monitor -------------------------------------------------------------

counter() { # name counter
    json_field "$1" "s['counters']['$2']"
}
counter_above() { # name counter value: true once the counter exceeds value
    [ "$(counter "$1" "$2")" -gt "$3" ]
}

address_change_is_major() {
    local major minor
    major=$(counter a link_changes_major)
    minor=$(counter a link_changes_minor)
    # An address on an interface without the default route: minor.
    in_a ip link add d15side type veth peer name d15side-peer || return 1
    in_a ip link set d15side up || return 1
    sleep 1
    major=$(counter a link_changes_major)
    minor=$(counter a link_changes_minor)
    in_a ip addr add 192.0.2.77/32 dev d15side || return 1
    wait_for 30 counter_above a link_changes_minor "$minor" || return 1
    [ "$(counter a link_changes_major)" = "$major" ] || { echo "a side address was major"; return 1; }
    # A second address on the default interface: major (rebind, paths reset).
    in_a ip addr add 10.78.0.41/24 dev veth-a || return 1
    wait_for 30 counter_above a link_changes_major "$major" || { echo "not major"; return 1; }
    grep -q "the default interface's addresses changed: a major change" "$TMP/a.log" || return 1
    in_a ip addr del 10.78.0.41/24 dev veth-a || return 1
    in_a ip link del d15side || return 1
    in_a ping -c 2 -i 0.2 -W 2 100.64.1.2 || return 1
}
check "link monitor: an address change on the default interface is major, elsewhere minor" address_change_is_major

links_down_and_up() {
    local down major
    down=$(counter a link_changes_down)
    major=$(counter a link_changes_major)
    in_a ip link set veth-a down || return 1
    wait_for 30 counter_above a link_changes_down "$down" || return 1
    grep -q "DNS caches flushed" "$TMP/a.log" || return 1
    grep -q "network state changed.*network_up=false" "$TMP/a.log" || return 1
    in_a ip link set veth-a up || return 1
    in_a ip route replace default via 10.78.0.254 || return 1
    wait_for 30 counter_above a link_changes_major "$major" || return 1
    grep -q "network state changed.*network_up=true" "$TMP/a.log" || return 1
    grep -q 'endpoint re-discovery asked for.*link-change-major' "$TMP/a.log" || return 1
    wait_for 50 in_a ping -c 1 -W 1 100.64.1.2 || return 1
}
check "link monitor: all links down flushes DNS; back up is a major change, re-discovers, and traffic flows" links_down_and_up

# --- Interop ------------------------------------------------------------------
# C becomes a WireGuard we did not write, configured with wg; A (wgmeshd,
# batched data plane) talks to it: C starts the first handshake, then pings
# go both ways and a TCP transfer runs in each direction.
TRAFFIC="$HERE/e2e_traffic.py"
tcp_one_way() { # from-ns to-ns to-addr port
    local from=$1 to=$2 addr=$3 port=$4
    rm -f "$TMP/ready" "$TMP/got"
    ip netns exec "$to" timeout 60 python3 "$TRAFFIC" tcp-recv "$addr" "$port" "$TMP/got" "$TMP/ready" &
    local server=$!
    for _ in $(seq 100); do [ -e "$TMP/ready" ] && break; sleep 0.05; done
    ip netns exec "$from" timeout 60 python3 "$TRAFFIC" tcp-send "$addr" "$port" "$TMP/blob" || { kill "$server" 2>/dev/null; return 1; }
    wait "$server" || return 1
    [ "$(cut -d' ' -f1 "$TMP/got")" = "$(sha256sum <"$TMP/blob" | cut -d' ' -f1)" ] || return 1
}
stop_namespace_processes() { # ns: TERM, then KILL, every process of this suite's namespace
    # (boringtun-cli leaves a child behind the PID it was started as).
    local ns=$1 pids
    pids=$(ip netns pids "$ns")
    [ -n "$pids" ] || return 0
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(ip netns pids "$ns")" ] && return 0; sleep 0.1; done
    kill -KILL $(ip netns pids "$ns") 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(ip netns pids "$ns")" ] && return 0; sleep 0.1; done
}
interop_with() { # command running interface wgd15G in the foreground
    local pid
    rm -f /var/run/wireguard/wgd15G.sock
    in_c "$@" >"$TMP/interop.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do [ -S /var/run/wireguard/wgd15G.sock ] && break; sleep 0.1; done
    [ -S /var/run/wireguard/wgd15G.sock ] || { echo "no UAPI socket"; cat "$TMP/interop.log"; return 1; }
    echo "$KEY_C" >"$TMP/key-c"
    in_c wg set wgd15G private-key "$TMP/key-c" listen-port 51820 \
        peer "$PUB_A" endpoint 10.78.0.1:51820 allowed-ips 100.64.1.1/32 || return 1
    in_c ip addr add 100.64.1.3/32 dev wgd15G || return 1
    in_c ip link set wgd15G mtu 1280 up || return 1
    in_c ip route add 100.64.1.1/32 dev wgd15G || return 1
    in_c ping -c 3 -i 0.2 -W 2 100.64.1.1 || return 1
    in_a ping -c 3 -i 0.2 -W 2 100.64.1.3 || return 1
    in_a ping -c 3 -i 0.2 -W 2 -s 1200 100.64.1.3 || return 1
    head -c 8M /dev/urandom >"$TMP/blob" || return 1
    tcp_one_way "$NS_A" "$NS_C" 100.64.1.3 5301 || { echo "A to C failed"; return 1; }
    tcp_one_way "$NS_C" "$NS_A" 100.64.1.1 5302 || { echo "C to A failed"; return 1; }
    api a status | grep -E "node-g .* handshake [0-9]+s ago" >/dev/null || return 1
    stop_namespace_processes "$NS_C"
    for _ in $(seq 50); do in_c ip link show wgd15G >/dev/null 2>&1 || break; sleep 0.1; done
    # A still holds a session with the process that just ended; the next
    # check's handshake from C replaces it.
}
UPSTREAM_WG_GO=${WIREGUARD_GO_UPSTREAM:-$HERE/../../../shared/bench-tools/wireguard-go}
if ! command -v wg >/dev/null; then
    skip "interop" "wg (wireguard-tools) not installed"
else
    if [ -x "$UPSTREAM_WG_GO" ]; then
        check "interop with upstream wireguard-go v0.0.20250522 (offloads, GSO/GRO) against the batched data plane: pings and TCP both ways" \
            interop_with env WG_PROCESS_FOREGROUND=1 "$UPSTREAM_WG_GO" -f wgd15G
    else
        skip "interop with upstream wireguard-go" "no binary at $UPSTREAM_WG_GO (set WIREGUARD_GO_UPSTREAM)"
    fi
    if command -v wireguard-go >/dev/null; then
        check "interop with Debian's wireguard-go against the batched data plane: pings and TCP both ways" \
            interop_with wireguard-go -f wgd15G
    else
        skip "interop with Debian's wireguard-go" "not installed"
    fi
    BORINGTUN=${BORINGTUN_CLI:-$(command -v boringtun-cli || true)}
    if [ -z "$BORINGTUN" ] && [ -x "$HOME/.cache/wgmesh-bench/boringtun/bin/boringtun-cli" ]; then
        BORINGTUN=$HOME/.cache/wgmesh-bench/boringtun/bin/boringtun-cli
    fi
    if [ -n "$BORINGTUN" ]; then
        check "interop with boringtun-cli against the batched data plane: pings and TCP both ways" \
            interop_with env WG_SUDO=1 "$BORINGTUN" --foreground --threads 1 \
            --disable-drop-privileges --log "$TMP/boringtun.log" wgd15G
    else
        skip "interop with boringtun-cli" "not installed; set BORINGTUN_CLI"
    fi
fi

# --- Exit node ----------------------------------------------------------------
# C becomes a wgmeshd that advertises itself as exit node, with a second
# link to wgm-d15-net (203.0.113.0/24), a namespace standing for the
# internet that only C reaches. A is reloaded with `[exit_node] peer =
# "node-g"` (C's key): what A sends outside the tailnet leaves through C,
# masqueraded behind C's 203.0.113.1, and the tunnel keeps working.
ip netns add "$NS_NET"
ip -n "$NS_NET" link set lo up
ip link add veth-cn netns "$NS_C" type veth peer name veth-nc netns "$NS_NET"
ip -n "$NS_C" addr add 203.0.113.1/24 dev veth-cn
ip -n "$NS_C" link set veth-cn up
ip -n "$NS_NET" addr add 203.0.113.2/24 dev veth-nc
ip -n "$NS_NET" link set veth-nc up
cat >"$TMP/c.toml" <<CONF
[interface]
name = "wgd15C"
private_key = "$KEY_C"
listen_port = 51820
addresses = ["100.64.1.3/32"]
mtu = 1280

[dns]
mode = "off"

[exit_node]
advertise = true

[[peer]]
name = "node-a"
public_key = "$PUB_A"
endpoints = ["10.78.0.1:51820"]
allowed_ips = ["100.64.1.1/32"]
CONF
cp "$TMP/a.toml" "$TMP/a-plain.toml"
printf '\n[exit_node]\npeer = "node-g"\n' >>"$TMP/a.toml"

have_nft() { command -v nft >/dev/null; }
udp_source_seen_by_net() { # prints the source address a datagram from A reaches the "internet" with
    rm -f "$TMP/udp-src"
    ip netns exec "$NS_NET" timeout 10 /usr/bin/python3 -c "
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('203.0.113.2', 7000)); s.settimeout(8)
open(sys.argv[2], 'w').write('ready')
data, addr = s.recvfrom(100); open(sys.argv[1], 'w').write(addr[0])" "$TMP/udp-src" "$TMP/udp-ready" &
    local server=$!
    for _ in $(seq 100); do [ -e "$TMP/udp-ready" ] && break; sleep 0.05; done
    rm -f "$TMP/udp-ready"
    for _ in $(seq 5); do
        in_a /usr/bin/python3 -c "
import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('203.0.113.2', 7000))" 2>/dev/null || true
        [ -s "$TMP/udp-src" ] && break
        sleep 0.3
    done
    wait "$server" 2>/dev/null || true
    cat "$TMP/udp-src" 2>/dev/null
}

exit_node_routes_the_internet() {
    start "$NS_C" c || return 1
    # Without an exit node the "internet" is unreachable from A.
    if in_a ping -c 1 -W 1 203.0.113.2 >/dev/null 2>&1; then echo "reachable before"; return 1; fi
    in_c sysctl -n net.ipv4.ip_forward | grep 1 >/dev/null || return 1
    in_c nft list table inet wgmesh-wgd15C | grep "masquerade" >/dev/null || return 1
    api c status | grep "^health: ok$" >/dev/null || { api c status; return 1; }
    api a reload || return 1
    # C speaks first, so A drops the session of the wireguard-go it replaced.
    in_c ping -c 2 -i 0.2 -W 2 100.64.1.1 || return 1
    wait_for 30 in_a ping -c 1 -W 1 203.0.113.2 || return 1
    in_a ping -c 3 -i 0.2 -W 2 203.0.113.2 || return 1
    [ "$(udp_source_seen_by_net)" = 203.0.113.1 ] || { echo "not masqueraded behind the exit node"; return 1; }
    api a status | tee "$TMP/status-a"
    grep "^exit node: node-g" "$TMP/status-a" >/dev/null || return 1
    grep "^health: ok$" "$TMP/status-a" >/dev/null || return 1
    # The policy routing: marked datagrams keep the main table, the rest
    # goes to table 52, whose default route is the tunnel.
    in_a ip rule show | tee "$TMP/rules"
    grep -E "^5210:.*fwmark 0x80000/0xff0000 lookup main" "$TMP/rules" >/dev/null || return 1
    grep -E "^5230:.*lookup main suppress_prefixlength 0" "$TMP/rules" >/dev/null || return 1
    grep -E "^5270:.*lookup 52" "$TMP/rules" >/dev/null || return 1
    in_a ip route show table 52 | grep "default dev wgd15A" >/dev/null || return 1
    in_a ip -6 route show table 52 | grep "default dev wgd15A" >/dev/null || return 1
    in_a wg show wgd15A fwmark | grep 0x80000 >/dev/null || return 1
    # The tunnel itself keeps working: B through the tunnel, and C's
    # handshake endpoint through the main table.
    in_a ping -c 2 -i 0.2 -W 2 100.64.1.2 || return 1
    in_a ping -c 2 -i 0.2 -W 2 100.64.1.3 || return 1
    in_a ip route get 10.78.0.3 mark 0x80000 | grep "dev veth-a" >/dev/null || return 1
}
exit_node_torn_down() {
    # A stops using the exit node: rules, table and mark go.
    cp "$TMP/a-plain.toml" "$TMP/a.toml" || return 1
    api a reload || return 1
    wait_for 30 sh -c "! ip netns exec '$NS_A' ip rule show | grep -q 'lookup 52'" || return 1
    [ -z "$(in_a ip route show table 52 2>/dev/null)" ] || return 1
    [ -z "$(in_a ip -6 route show table 52 2>/dev/null)" ] || return 1
    ! api a status | grep "^exit node" >/dev/null || return 1
    in_a wg show wgd15A fwmark | grep -v 0x80000 >/dev/null || return 1
    if in_a ping -c 1 -W 1 203.0.113.2 >/dev/null 2>&1; then echo "still routed"; return 1; fi
    in_a ping -c 2 -i 0.2 -W 2 100.64.1.3 || return 1
    # C stops: its nftables table goes and forwarding is off again.
    kill -TERM "${PID[c]}" || return 1
    for _ in $(seq 100); do kill -0 "${PID[c]}" 2>/dev/null || break; sleep 0.1; done
    if in_c nft list table inet wgmesh-wgd15C >/dev/null 2>&1; then echo "nft table left"; return 1; fi
    [ "$(in_c sysctl -n net.ipv4.ip_forward)" = 0 ] || return 1
    [ "$(in_c sysctl -n net.ipv6.conf.all.forwarding)" = 0 ] || return 1
    # A with the exit node again, then stopped: nothing of it is left.
    printf '\n[exit_node]\npeer = "node-g"\n' >>"$TMP/a.toml"
    api a reload || return 1
    in_a ip rule show | grep "lookup 52" >/dev/null || return 1
    kill -TERM "${PID[a]}" || return 1
    for _ in $(seq 100); do kill -0 "${PID[a]}" 2>/dev/null || break; sleep 0.1; done
    if in_a ip rule show | grep -E "lookup 52|0x80000" >/dev/null; then in_a ip rule show; return 1; fi
}
if have_nft; then
    check "exit node: traffic outside the tailnet leaves through the exit node, masqueraded; the tunnel keeps working; status shows it" exit_node_routes_the_internet
    check "exit node: rules, table 52, the socket mark, the nft table and forwarding are undone on reload and on exit" exit_node_torn_down
else
    skip "exit node" "nft (Debian package nftables) not installed"
fi

if [ "$FAILED" != 0 ]; then
    for n in a b c; do [ -f "$TMP/$n.log" ] || continue; echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-40}" "$TMP/$n.log"; done
fi
echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" = 0 ]
