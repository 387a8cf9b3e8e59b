#!/usr/bin/env bash
# End-to-end test of wgmeshd on Linux: three network namespaces joined by
# veth pairs to a bridge (in a fourth), one daemon in each, real TUN devices,
# netlink routes, the CLI, `wg`, and Debian's wireguard-go for interop; then
# three more namespaces on the same bridge for the batched data plane
# (WGMESH_FASTPATH=1) against the plain one and itself.
# Needs root and iproute2. Everything it creates it deletes on exit, also on
# failure. Every wait is bounded. Usage: adapters/tests/e2e.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
NS_A=wgm-e2e-a
NS_B=wgm-e2e-b
NS_C=wgm-e2e-c
NS_BR=wgm-e2e-br
# The fast-path checks' own nodes: X and Y batched, P plain.
NS_X=wgm-e2e-x
NS_Y=wgm-e2e-y
NS_P=wgm-e2e-p
ALL_NS=("$NS_A" "$NS_B" "$NS_C" "$NS_X" "$NS_Y" "$NS_P" "$NS_BR")
TRAFFIC=$(realpath "$(dirname "$0")/e2e_traffic.py")
# The configs hold private keys inline, and wgmeshd refuses a keyed file that
# others may read: everything this script writes is private.
umask 077
# The attacks made as an unprivileged user run as uid 65534 with the
# system's python (root's may live under /root, which uid 65534 cannot read).
AS_NOBODY=(setpriv --reuid=65534 --regid=65534 --clear-groups)
SYS_PYTHON=/usr/bin/python3
TMP=$(mktemp -d /tmp/wgmesh-e2e.XXXXXX)
PASSED=0
FAILED=0
PIDS=()
declare -A PID

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    echo "e2e: needs root and iproute2; skipping"
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
    for n in A B C X Y P; do rm -f "/var/run/wireguard/wgm$n.sock"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
# Notes for the reader go to fd 3, which check() does not capture.
exec 3>&1
trap "exit 130" INT TERM

# check NAME COMMAND...: COMMAND runs as an `if` condition, where `set -e`
# does not apply; so every step of a check function that can fail ends in
# `|| return 1` (or is an explicit test that returns).
check() {
    local name=$1; shift
    if "$@" >"$TMP/out" 2>&1; then
        PASSED=$((PASSED + 1)); echo "ok   $name"
    else
        FAILED=$((FAILED + 1)); echo "FAIL $name"; sed 's/^/     /' "$TMP/out" | tail -20
    fi
}

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
in_c() { ip netns exec "$NS_C" "$@"; }

# The network: 10.77.0.1, .2 and .3 on one bridge (.11 to .13 join later).
# Namespaces left by an aborted earlier run of this script are removed first.
for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
ip netns add "$NS_BR"
ip -n "$NS_BR" link add br0 type bridge
ip -n "$NS_BR" link set br0 up
add_ns() { # x octet: namespace wgm-e2e-x at 10.77.0.octet on the bridge
    local x=$1 ns="wgm-e2e-$1"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "veth-$x" netns "$ns" type veth peer name "br-$x" netns "$NS_BR"
    ip -n "$NS_BR" link set "br-$x" master br0 up
    ip -n "$ns" addr add "10.77.0.$2/24" dev "veth-$x"
    ip -n "$ns" link set "veth-$x" up
}
add_ns a 1
add_ns b 2
add_ns c 3

KEY_A=$("$WGMESH" genkey); PUB_A=$(echo "$KEY_A" | "$WGMESH" pubkey)
KEY_B=$("$WGMESH" genkey); PUB_B=$(echo "$KEY_B" | "$WGMESH" pubkey)
DISCO_A=$("$WGMESH" genkey); DPUB_A=$(echo "$DISCO_A" | "$WGMESH" pubkey)
DISCO_B=$("$WGMESH" genkey); DPUB_B=$(echo "$DISCO_B" | "$WGMESH" pubkey)
KEY_C=$("$WGMESH" genkey); PUB_C=$(echo "$KEY_C" | "$WGMESH" pubkey)
DISCO_C=$("$WGMESH" genkey); DPUB_C=$(echo "$DISCO_C" | "$WGMESH" pubkey)

peer_section() { # name pub disco ip endpoint: a [[peer]] with the ip's v4 and v6 addresses
    cat <<CONF

[[peer]]
name = "$1"
public_key = "$2"
disco_key = "$3"
endpoints = ["$5"]
allowed_ips = ["$4/32", "fd7a:115c:a1e0::${4##*.}/128"]
CONF
}
write_config() { # name key disco addr peer_name peer_pub peer_disco peer_ip peer_endpoint
    cat <<CONF
[interface]
name = "$1"
private_key = "$2"
disco_private_key = "$3"
listen_port = 51820
addresses = ["$4/32", "fd7a:115c:a1e0::${4##*.}/128"]
mtu = 1280

[dns]
mode = "resolv-conf"

[magicdns]
enable = true
domain = "tail.e2e"
# The stub resolvers of the MagicDNS checks: dnsmasq in B's and C's
# namespaces, never an outside address.
upstreams = ["10.77.0.2"]
split_dns = { "corp.e2e" = ["10.77.0.3"] }
CONF
    peer_section "$5" "$6" "$7" "$8" "$9"
}
write_config wgmA "$KEY_A" "$DISCO_A" 100.64.0.1 node-b "$PUB_B" "$DPUB_B" 100.64.0.2 10.77.0.2:51820 >"$TMP/a.toml"
write_config wgmB "$KEY_B" "$DISCO_B" 100.64.0.2 node-a "$PUB_A" "$DPUB_A" 100.64.0.1 10.77.0.1:51820 >"$TMP/b.toml"
printf '\n[bird]\nsocket = "%s"\n' "$TMP/bird.ctl" >>"$TMP/a.toml"
printf '\n[api]\nmetrics_listen = "127.0.0.1:9101"\n' >>"$TMP/a.toml"
printf '\n[flowlog]\npath = "%s"\ninterval_secs = 1\n' "$TMP/flows.jsonl" >>"$TMP/a.toml"
write_config wgmC "$KEY_C" "$DISCO_C" 100.64.0.3 node-a "$PUB_A" "$DPUB_A" 100.64.0.1 10.77.0.1:51820 >"$TMP/c.toml"
for n in a b c; do
    echo "nameserver 192.0.2.53" >"$TMP/resolv-$n.conf"
    mkdir -p "$TMP/state-$n"
done

start() { # ns name [VAR=VALUE...] (more environment for wgmeshd)
    local ns=$1 n=$2 mask=022
    # Node A inherits the most permissive umask there is: its sockets and
    # directories must be private all the same.
    [ "$n" = a ] && mask=000
    ip netns exec "$ns" sh -c 'umask "$0"; exec "$@"' "$mask" env RUST_LOG="${E2E_LOG:-info}" "${@:3}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" --resolv-conf "$TMP/resolv-$n.conf" >"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
    PID[$n]=$!
    for _ in $(seq 100); do [ -S "$TMP/state-$n/wgm${n^^}.sock" ] && break; sleep 0.1; done
    # The routes follow the API by a few milliseconds.
    for _ in $(seq 100); do
        ip netns exec "$ns" ip route show dev "wgm${n^^}" 2>/dev/null | grep -q 100.64 && return 0
        sleep 0.05
    done
    echo "wgmeshd $n did not start"; cat "$TMP/$n.log"; return 1
}
start "$NS_A" a
start "$NS_B" b
API_A=(--socket "$TMP/state-a/wgmA.sock")
API_B=(--socket "$TMP/state-b/wgmB.sock")

# Bad config files are refused with file:line and field, and a non-zero exit.
bad_config() {
    sed 's#"100.64.0.1/32"#"100.64.0.1/40"#' "$TMP/a.toml" >"$TMP/bad.toml" || return 1
    if "$WGMESHD" --check --config "$TMP/bad.toml" 2>"$TMP/err"; then return 1; fi
    grep -q "bad.toml:6:.*interface.addresses" "$TMP/err" || return 1
}
check "bad config is refused with file, line and field" bad_config

check "route and address applied" in_a sh -c "ip addr show wgmA | grep -q 100.64.0.1/32 && ip route show dev wgmA | grep -q 100.64.0.2"
check "resolv.conf written" grep -q "nameserver 100.100.100.100" "$TMP/resolv-a.conf"
check "kernel ping across the tunnel" in_a ping -c 3 -i 0.2 -W 2 100.64.0.2

# MagicDNS: A's resolver at 100.100.100.100 and fd7a:115c:a1e0::53 answers
# the tailnet's names itself and forwards the rest to stub resolvers
# (dnsmasq) in B's namespace (the default upstream, 10.77.0.2) and C's (the
# split-DNS route for corp.e2e, 10.77.0.3). The stubs serve made-up names
# only; nothing leaves the machine.
dns_stub() { # ns listen-address name: dnsmasq in the foreground, its PID in PIDS
    local ns=$1 addr=$2 name=$3; shift 3
    ip netns exec "$ns" dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll \
        --bind-interfaces --listen-address="$addr" --port=53 --user=root \
        --pid-file="$TMP/dnsmasq-$name.pid" --log-queries --log-facility="$TMP/dnsmasq-$name.log" "$@" &
    PIDS+=($!)
    for _ in $(seq 50); do
        grep -q "$addr" <<<"$(ip netns exec "$ns" ss -Hlnu "sport = :53" 2>/dev/null)" && return 0
        sleep 0.1
    done
    echo "dnsmasq $name did not start"; return 1
}
big_txt_args() { # ten TXT records of 100 bytes each: about 1.2 KB, over 512
    local i
    for i in $(seq 10); do printf -- '--txt-record=big.example.com,"%02d%s"\n' "$i" "$(printf 'x%.0s' $(seq 98))"; done
}
mdig() { in_a dig +time=2 +tries=1 "$@"; }
magicdns_stubs_start() {
    dns_stub "$NS_B" 10.77.0.2 b --address=/www.example.com/198.51.100.7 $(big_txt_args) || return 1
    dns_stub "$NS_C" 10.77.0.3 c --address=/corp.e2e/10.99.0.3 || return 1
}
magicdns_answers_peer_names() {
    local out
    out=$(mdig +short @100.100.100.100 node-b.tail.e2e A) || return 1
    [ "$out" = 100.64.0.2 ] || { echo "node-b.tail.e2e A: '$out'"; return 1; }
    out=$(mdig +short @100.100.100.100 NODE-B.Tail.E2E. A) || return 1
    [ "$out" = 100.64.0.2 ] || { echo "NODE-B.Tail.E2E. A: '$out'"; return 1; }
    out=$(mdig +short @100.100.100.100 node-b A) || return 1
    [ "$out" = 100.64.0.2 ] || { echo "node-b A: '$out'"; return 1; }
    out=$(mdig +short +tcp @100.100.100.100 node-b.tail.e2e A) || return 1
    [ "$out" = 100.64.0.2 ] || { echo "node-b.tail.e2e A over TCP: '$out'"; return 1; }
}
magicdns_answers_aaaa_over_ipv6() {
    local out
    out=$(mdig +short @fd7a:115c:a1e0::53 node-b.tail.e2e AAAA) || return 1
    [ "$out" = fd7a:115c:a1e0::2 ] || { echo "AAAA via fd7a:115c:a1e0::53: '$out'"; return 1; }
    out=$(mdig +short @100.100.100.100 node-b.tail.e2e AAAA) || return 1
    [ "$out" = fd7a:115c:a1e0::2 ] || { echo "AAAA via 100.100.100.100: '$out'"; return 1; }
}
magicdns_nxdomain_under_the_tailnet_domain() {
    mdig @100.100.100.100 nobody.tail.e2e A >"$TMP/dig.out" || return 1
    grep -q "status: NXDOMAIN" "$TMP/dig.out" || { cat "$TMP/dig.out"; return 1; }
    grep -q "flags: qr aa" "$TMP/dig.out" || { cat "$TMP/dig.out"; return 1; }
    ! grep -q "nobody.tail.e2e" "$TMP/dnsmasq-b.log" || { echo "asked upstream"; return 1; }
}
magicdns_getent_resolves_peer_names() {
    # The system resolver of A's namespace: A's resolv.conf (written by
    # wgmeshd: nameserver 100.100.100.100, search tail.e2e) mounted over
    # /etc/resolv.conf in a mount namespace of this command only.
    local out
    out=$(in_a unshare -m --propagation private sh -c \
        "mount --bind '$TMP/resolv-a.conf' /etc/resolv.conf && getent ahostsv4 node-b && getent hosts node-b") || return 1
    echo "$out"
    echo "$out" | grep -q "^100.64.0.2 " || return 1
    echo "$out" | grep -q "node-b" || return 1
}
magicdns_forwards_other_names() {
    local out
    out=$(mdig +short @100.100.100.100 www.example.com A) || return 1
    [ "$out" = 198.51.100.7 ] || { echo "www.example.com A: '$out'"; return 1; }
    out=$(mdig +short +tcp @100.100.100.100 www.example.com A) || return 1
    [ "$out" = 198.51.100.7 ] || { echo "www.example.com A over TCP: '$out'"; return 1; }
    grep -q "query\[A\] www.example.com from 10.77.0.1" "$TMP/dnsmasq-b.log" || { cat "$TMP/dnsmasq-b.log"; return 1; }
}
magicdns_split_dns_goes_to_its_resolver() {
    local out
    out=$(mdig +short @100.100.100.100 host.corp.e2e A) || return 1
    [ "$out" = 10.99.0.3 ] || { echo "host.corp.e2e A: '$out'"; return 1; }
    grep -q "query\[A\] host.corp.e2e from 10.77.0.1" "$TMP/dnsmasq-c.log" || return 1
    ! grep -q "host.corp.e2e" "$TMP/dnsmasq-b.log" || { echo "went to the default upstream"; return 1; }
}
magicdns_large_answer_over_tcp() {
    # Without EDNS the answer (about 1.2 KB) does not fit 512 bytes: the stub
    # truncates it, the resolver asks the stub again over TCP, and hands the
    # client the truncated form; dig retries over TCP and gets all ten.
    mdig +noedns @100.100.100.100 big.example.com TXT >"$TMP/dig.out" 2>&1 || { cat "$TMP/dig.out"; return 1; }
    grep -q "Truncated, retrying in TCP mode" "$TMP/dig.out" || { cat "$TMP/dig.out"; return 1; }
    [ "$(grep -c '^big.example.com\..*TXT' "$TMP/dig.out")" = 10 ] || { cat "$TMP/dig.out"; return 1; }
    mdig +tcp +short @100.100.100.100 big.example.com TXT >"$TMP/dig.out" || return 1
    [ "$(wc -l <"$TMP/dig.out")" = 10 ] || { cat "$TMP/dig.out"; return 1; }
    grep -q "query\[TXT\] big.example.com from 10.77.0.1" "$TMP/dnsmasq-b.log" || return 1
}
magicdns_addresses_are_never_a_source() {
    # 100.100.100.100 and fd7a:115c:a1e0::53 are on the TUN for local
    # delivery only: the node's own traffic keeps its own source addresses
    # (a peer drops packets from addresses outside its allowed IPs).
    # Each output is read whole before grep: `grep -q` closing the pipe
    # early would fail the pipeline with SIGPIPE under pipefail.
    local addrs v4 v6
    addrs=$(in_a ip addr show wgmA) && v4=$(in_a ip route get 100.64.0.2) \
        && v6=$(in_a ip -6 route get fd7a:115c:a1e0::2) || return 1
    echo "$addrs"; echo "$v4"; echo "$v6"
    grep -q "inet 100.100.100.100/32 scope host" <<<"$addrs" || return 1
    grep -q "inet6 fd7a:115c:a1e0::53/128 scope global deprecated" <<<"$addrs" || return 1
    grep -q "src 100.64.0.1 " <<<"$v4" || return 1
    grep -q "src fd7a:115c:a1e0::1 " <<<"$v6" || return 1
}
check "magicdns_addresses_are_never_a_source: host scope and deprecated on the TUN" magicdns_addresses_are_never_a_source
if command -v dig >/dev/null && command -v dnsmasq >/dev/null; then
    check "magicdns_stubs_start: dnsmasq stubs in B's and C's namespaces" magicdns_stubs_start
    check "magicdns_answers_peer_names: A, any case, bare and under the domain, UDP and TCP" magicdns_answers_peer_names
    check "magicdns_answers_aaaa_over_ipv6: AAAA at fd7a:115c:a1e0::53" magicdns_answers_aaaa_over_ipv6
    check "magicdns_nxdomain_under_the_tailnet_domain: authoritative, not forwarded" magicdns_nxdomain_under_the_tailnet_domain
    check "magicdns_getent_resolves_peer_names: getent through A's resolv.conf" magicdns_getent_resolves_peer_names
    check "magicdns_forwards_other_names: to the upstream stub, UDP and TCP" magicdns_forwards_other_names
    check "magicdns_split_dns_goes_to_its_resolver: corp.e2e to C's stub" magicdns_split_dns_goes_to_its_resolver
    check "magicdns_large_answer_over_tcp: truncated over UDP, whole over TCP" magicdns_large_answer_over_tcp
else
    echo "skip MagicDNS checks (dig and dnsmasq not installed)"
fi
check "kernel ping across the tunnel over IPv6" in_a ping -6 -c 3 -i 0.2 -W 2 fd7a:115c:a1e0::2
check "wgmesh ping --tsmp over IPv6" in_a "$WGMESH" "${API_A[@]}" ping --tsmp -c 3 fd7a:115c:a1e0::2
check "wgmesh ping --tsmp" in_a "$WGMESH" "${API_A[@]}" ping --tsmp -c 3 100.64.0.2
check "wgmesh ping --icmp" in_a "$WGMESH" "${API_A[@]}" ping --icmp -c 3 100.64.0.2
check "wgmesh ping --disco" in_a "$WGMESH" "${API_A[@]}" ping --disco -c 5 100.64.0.2

# Issue 15: `-c N` sends N pings and prints a line for each (it used to stop
# at the first pong), then a summary.
ping_count_sends_every_ping() {
    in_a "$WGMESH" "${API_A[@]}" ping --tsmp -c 3 100.64.0.2 >"$TMP/ping-count" || return 1
    [ "$(grep -c '^pong from' "$TMP/ping-count")" = 3 ] || { cat "$TMP/ping-count"; return 1; }
    grep -q '^3 pings sent, 3 answered' "$TMP/ping-count" || return 1
}
check "wgmesh ping -c 3 sends three pings and prints three lines" ping_count_sends_every_ping

status_json() {
    "$WGMESH" "${API_A[@]}" status --json >"$TMP/status.json" || return 1
    python3 - "$TMP/status.json" <<'PY' || return 1
import json, sys
s = json.load(open(sys.argv[1]))
p = s["peers"][0]
assert p["name"] == "node-b", p
assert p["last_handshake_unix"], p
assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0, p
assert s["counters"]["handshakes_completed"] >= 1, s["counters"]
PY
}
check "wgmesh status --json shows handshake and bytes" status_json
metrics_http() {
    in_a python3 - <<'PY' || return 1
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=5).read().decode()
assert 'wgmesh_handshakes_completed{interface="wgmA"}' in body, body[:300]
assert "wgmesh_peer_rx_bytes{" in body
PY
}
check "Prometheus metrics over HTTP on loopback" metrics_http

# Security (issue 18): the local surfaces against an unprivileged user
# (uid 65534) on the same machine, node A running under umask 000.
mode_of() { stat -c %a "$1"; }
sockets_and_directories_are_private_under_umask_000() {
    local api=$TMP/state-a/wgmA.sock uapi=/var/run/wireguard/wgmA.sock path
    for path in "$api" "$uapi"; do
        [ -S "$path" ] || { echo "no socket $path"; return 1; }
        [ "$(( 8#$(mode_of "$path") & 8#077 ))" = 0 ] || { echo "$path mode $(mode_of "$path")"; return 1; }
    done
    [ "$(( 8#$(mode_of "$TMP/state-a") & 8#077 ))" = 0 ] || { echo "state dir mode $(mode_of "$TMP/state-a")"; return 1; }
    [ "$(( 8#$(mode_of /var/run/wireguard) & 8#022 ))" = 0 ] || { echo "/var/run/wireguard mode $(mode_of /var/run/wireguard)"; return 1; }
    # uid 65534 cannot even connect to the UAPI socket.
    if in_a "${AS_NOBODY[@]}" "$SYS_PYTHON" -c "import socket; socket.socket(socket.AF_UNIX).connect('$uapi')" 2>"$TMP/err"; then
        echo "uid 65534 connected to $uapi"; return 1
    fi
    grep -q PermissionError "$TMP/err" || { cat "$TMP/err"; return 1; }
}
check "sockets_and_directories_are_private_under_umask_000" sockets_and_directories_are_private_under_umask_000

# Even when the file mode lets a caller in (the window the issue measured
# between bind and chmod, or a careless chmod), SO_PEERCRED refuses it: the
# sockets are opened to all for the test through a hard link, then closed.
unprivileged_user_cannot_use_api_or_uapi_socket() {
    local dir=/tmp/wgm-e2e-peercred status=0 api_mode uapi_mode
    rm -rf "$dir"; mkdir -m 755 "$dir" || return 1
    ln "$TMP/state-a/wgmA.sock" "$dir/api.sock" || return 1
    ln /var/run/wireguard/wgmA.sock "$dir/uapi.sock" || return 1
    api_mode=$(mode_of "$dir/api.sock") && uapi_mode=$(mode_of "$dir/uapi.sock") || return 1
    chmod 666 "$dir/api.sock" "$dir/uapi.sock" || return 1
    in_a "${AS_NOBODY[@]}" "$SYS_PYTHON" - "$dir" <<'PY' || status=1
import json, socket, sys
d = sys.argv[1]
def ask(path, data):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path)
    s.sendall(data); out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out.decode(errors="replace")
uapi = ask(d + "/uapi.sock", b"get=1\n\n")
assert uapi == "errno=13\n\n", uapi
assert "private_key" not in uapi
bad = ask(d + "/uapi.sock", b"set=1\nlisten_port=1\n\n")
assert bad == "errno=13\n\n", bad
for cmd in ("status", "metrics", "reload"):
    answer = json.loads(ask(d + "/api.sock", json.dumps({"cmd": cmd}).encode() + b"\n"))
    assert not answer["ok"] and "permission denied" in answer["error"], (cmd, answer)
print("uid 65534 refused on both sockets")
PY
    chmod "$api_mode" "$dir/api.sock"; chmod "$uapi_mode" "$dir/uapi.sock"
    rm -rf "$dir"
    [ "$status" = 0 ] || return 1
    # Root still has everything.
    in_a "$WGMESH" "${API_A[@]}" status >/dev/null || return 1
}
check "unprivileged_user_cannot_use_api_or_uapi_socket" unprivileged_user_cannot_use_api_or_uapi_socket

uapi_refuses_oversized_and_malformed_requests() {
    python3 - /var/run/wireguard/wgmA.sock "${PID[a]}" <<'PY' || return 1
import socket, sys
path, pid = sys.argv[1], sys.argv[2]
def rss_kb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def exchange(data):
    s = socket.socket(socket.AF_UNIX); s.settimeout(15); s.connect(path)
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = b""
    try:
        while not out.endswith(b"\n\n") and (chunk := s.recv(65536)):
            out += chunk
    except ConnectionResetError:
        pass
    return out.decode(errors="replace")
before = rss_kb()
# 64 MiB without a newline: refused at the first KiB, not buffered.
answer = exchange(b"set=1\nprivate_key=" + b"a" * (64 << 20))
assert answer.startswith("errno=22"), answer
grown = rss_kb() - before
assert grown < 32 << 10, f"RSS grew by {grown} KiB"
assert exchange(b"set=1\n\xff\xfe=1\n\n") == "errno=22\n\n"
# fwmark is applied to the UDP socket (SO_MARK) and shown by get.
assert exchange(b"set=1\nfwmark=51820\n\n") == "errno=0\n\n"
assert "\nfwmark=51820\n" in exchange(b"get=1\n\n")
assert exchange(b"set=1\nfwmark=0\n\n") == "errno=0\n\n"
assert "fwmark=" not in exchange(b"get=1\n\n")
assert exchange(b"set=1\nfwmark=+1\n\n") == "errno=22\n\n"
assert exchange(b"set=1\nprivate_key=+" + b"a" * 63 + b"\n\n") == "errno=22\n\n"
print(f"RSS grew by {grown} KiB")
PY
    # The key line that failed to parse is named in the log, its value is not.
    if grep -q "aaaaaaaaaaaaaaaa" "$TMP/a.log"; then echo "a key value reached the log"; return 1; fi
    in_a "$WGMESH" "${API_A[@]}" status >/dev/null || return 1
}
check "uapi_refuses_oversized_and_malformed_requests" uapi_refuses_oversized_and_malformed_requests

metrics_survives_connection_flood() {
    in_a "${AS_NOBODY[@]}" "$SYS_PYTHON" - <<'PY' || return 1
import resource, socket, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
held = []
for _ in range(3000):
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect(("127.0.0.1", 9101))
    except BlockingIOError:
        pass
    except OSError:
        s.close(); continue
    held.append(s)
time.sleep(1)
print(f"held {len(held)} connections")
for s in held:
    s.close()
PY
    # The listener is still there and answers a proper scrape.
    in_a python3 - <<'PY' || return 1
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=10).read().decode()
assert 'wgmesh_handshakes_completed{interface="wgmA"}' in body, body[:300]
PY
}
check "metrics_survives_connection_flood" metrics_survives_connection_flood

metrics_refuse_dns_rebinding_and_declare_each_metric_once() {
    in_a "${AS_NOBODY[@]}" "$SYS_PYTHON" - <<'PY' || return 1
import socket, collections
def get(host):
    s = socket.create_connection(("127.0.0.1", 9101), timeout=10)
    s.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out.decode()
evil = get("evil.example:9101")
assert evil.startswith("HTTP/1.1 403"), evil[:200]
assert "wgmesh_peer_rx_bytes" not in evil
ok = get("localhost:9101")
assert ok.startswith("HTTP/1.1 200"), ok[:200]
types = collections.Counter(l.split()[2] for l in ok.split("\r\n\r\n", 1)[1].splitlines() if l.startswith("# TYPE "))
twice = [n for n, c in types.items() if c > 1]
assert not twice, twice
PY
}
check "metrics_refuse_dns_rebinding_and_declare_each_metric_once" metrics_refuse_dns_rebinding_and_declare_each_metric_once

config_with_a_key_readable_by_others_is_refused() {
    cp "$TMP/a.toml" "$TMP/open.toml" && chmod 644 "$TMP/open.toml" || return 1
    if "$WGMESHD" --check --config "$TMP/open.toml" 2>"$TMP/err"; then echo "accepted"; return 1; fi
    grep -q "holds a key but its mode 644" "$TMP/err" || { cat "$TMP/err"; return 1; }
    chmod 600 "$TMP/open.toml" && "$WGMESHD" --check --config "$TMP/open.toml" || return 1
}
check "config_with_a_key_readable_by_others_is_refused" config_with_a_key_readable_by_others_is_refused

# A new default route in A's namespace is a major link change: the engine
# counts it, rebinds its socket, and traffic keeps flowing.
link_change() {
    counter() {
        "$WGMESH" "${API_A[@]}" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["counters"]["link_changes_major"])'
    }
    local before after
    before=$(counter) || return 1
    in_a ip route add default via 10.77.0.254 dev veth-a || return 1
    after=$before
    for _ in $(seq 30); do after=$(counter); [ "$after" -gt "$before" ] && break; sleep 0.1; done
    in_a ip route del default via 10.77.0.254 dev veth-a || return 1
    [ "$after" -gt "$before" ] || { echo "link_changes_major stayed at $before"; return 1; }
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2 || return 1
}
check "a default-route change is a major link change; traffic survives the rebind" link_change

# An unprivileged process that loops on bind() of A's listen port while A
# rebinds (ten major link changes) never gets the port: the rebind keeps the
# same socket when the port stays the same, and binds a new one before it
# lets an old one go. Afterwards A still holds the port and traffic flows.
port_takeover_on_rebind_fails() {
    in_a "${AS_NOBODY[@]}" "$SYS_PYTHON" - 51820 >"$TMP/binder.out" 2>&1 <<'PY' &
import socket, sys, time
port = int(sys.argv[1])
won = 0
deadline = time.monotonic() + 6
while time.monotonic() < deadline:
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.bind((addr, port))
            won += 1
        except OSError:
            pass
        finally:
            s.close()
print(f"won {won}")
PY
    local binder=$! i
    for i in $(seq 10); do
        in_a ip route add default via 10.77.0.254 dev veth-a || true
        sleep 0.2
        in_a ip route del default via 10.77.0.254 dev veth-a || true
        sleep 0.2
    done
    wait "$binder"
    cat "$TMP/binder.out"
    grep -q "^won 0$" "$TMP/binder.out" || { echo "the unprivileged binder got the port"; return 1; }
    in_a ss -uanp | grep -q ":51820 .*wgmeshd" || { echo "wgmeshd no longer holds 51820"; in_a ss -uanp; return 1; }
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2 || return 1
}
check "port_takeover_on_rebind_fails" port_takeover_on_rebind_fails
check "wgmesh metrics" sh -c "'$WGMESH' ${API_A[*]} metrics | grep -q '^wgmesh_handshakes_completed{interface=\"wgmA\"} [1-9]'"

SIZE_MB=${E2E_TRANSFER_MB:-100}
tcp_transfer() {
    head -c "${SIZE_MB}M" /dev/urandom >"$TMP/blob" || return 1
    local want status=0; want=$(sha256sum <"$TMP/blob" | cut -d' ' -f1) || return 1
    rm -f "$TMP/got"
    in_b timeout 120 python3 - "$TMP/got" <<'PY' &
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("100.64.0.2", 5201)); srv.listen(1); srv.settimeout(60)
conn, _ = srv.accept(); h = hashlib.sha256()
while True:
    data = conn.recv(1 << 16)
    if not data: break
    h.update(data)
open(sys.argv[1], "w").write(h.hexdigest())
PY
    local server=$!
    sleep 0.5
    in_a timeout 120 python3 - "$TMP/blob" <<'PY' || { echo "sender failed"; status=1; }
import socket, sys
s = socket.create_connection(("100.64.0.2", 5201), timeout=30)
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(1 << 16):
        s.sendall(chunk)
s.close()
PY
    wait "$server" || { echo "receiver failed"; status=1; }
    [ "$status" = 0 ] || return 1
    [ "$(cat "$TMP/got")" = "$want" ] || return 1
}
check "TCP transfer of ${SIZE_MB} MB with matching checksum" tcp_transfer

flow_log() {
    sleep 1.5
    python3 - "$TMP/flows.jsonl" "$SIZE_MB" <<'PY' || return 1
import json, sys
flows = [json.loads(l) for l in open(sys.argv[1])]
flows = [f for f in flows if "summary" not in f]
tcp = [f for f in flows if f["proto"] == 6 and f["dst"] == "100.64.0.2:5201" and f["direction"] == "out"]
sent = sum(f["bytes"] for f in tcp)
assert sent >= int(sys.argv[2]) << 20, (sent, tcp[:3])
assert all(f["peer"] for f in tcp), tcp[:3]
assert any(f["proto"] == 1 and f["direction"] == "in" for f in flows), "no ICMP replies logged"
PY
}
check "flow log has the TCP transfer and the pings, per peer" flow_log

# Issue 18 item 5: the flow log is readable by its owner only.
flow_log_is_private() {
    [ "$(stat -c %a "$TMP/flows.jsonl")" = 600 ] || { stat -c %a "$TMP/flows.jsonl"; return 1; }
}
check "flow log file is created 0600" flow_log_is_private

capture_pcap() {
    in_a "$WGMESH" "${API_A[@]}" capture -o "$TMP/cap.pcap" --seconds 3 &
    local cap=$!
    sleep 0.5
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.2 || { wait "$cap"; return 1; }
    wait "$cap" || return 1
    python3 - "$TMP/cap.pcap" <<'PY' || return 1
import struct, sys
data = open(sys.argv[1], "rb").read()
magic, _, _, _, _, _, link = struct.unpack("<IHHiIII", data[:24])
assert magic == 0xa1b2c3d4 and link == 101, (hex(magic), link)
off, echo_req, echo_rep = 24, 0, 0
while off < len(data):
    _, _, incl, _ = struct.unpack("<IIII", data[off:off + 16])
    pkt = data[off + 16:off + 16 + incl]
    off += 16 + incl
    if pkt[0] >> 4 == 4 and pkt[9] == 1:
        t = pkt[(pkt[0] & 15) * 4]
        echo_req += t == 8
        echo_rep += t == 0
assert echo_req >= 3 and echo_rep >= 3, (echo_req, echo_rep)
PY
}
check "wgmesh capture writes the tunnel's packets as pcap" capture_pcap

capture_file_is_private_and_huge_durations_are_safe() {
    # A huge duration used to panic the connection's task with the hook on.
    in_a sh -c "umask 000; exec '$WGMESH' ${API_A[*]} capture -o '$TMP/cap2.pcap' --seconds 18446744073709551615" &
    local cap=$!
    sleep 1
    [ "$(mode_of "$TMP/cap2.pcap")" = 600 ] || { echo "pcap mode $(mode_of "$TMP/cap2.pcap")"; kill "$cap"; return 1; }
    [ "$(stat -c %s "$TMP/cap2.pcap")" -ge 24 ] || { echo "no pcap header"; kill "$cap"; return 1; }
    kill -TERM "$cap"; wait "$cap" || true
    if grep -q "panicked" "$TMP/a.log"; then grep panicked "$TMP/a.log"; return 1; fi
    in_a "$WGMESH" "${API_A[@]}" status >/dev/null || return 1
}
check "capture_file_is_private_and_huge_durations_are_safe" capture_file_is_private_and_huge_durations_are_safe

if command -v wg >/dev/null; then
    check "wg show lists the peer" sh -c "wg show wgmA | grep -q 'peer: $PUB_B' && wg show wgmA | grep -q 'latest handshake'"
fi

bad_reload() {
    cp "$TMP/a.toml" "$TMP/a.good" || return 1
    sed -i 's/listen_port = 51820/listen_port = 99999/' "$TMP/a.toml" || return 1
    if in_a "$WGMESH" "${API_A[@]}" reload 2>"$TMP/err"; then cp "$TMP/a.good" "$TMP/a.toml"; return 1; fi
    cp "$TMP/a.good" "$TMP/a.toml" || return 1
    grep -q "a.toml:5" "$TMP/err" || { cat "$TMP/err"; return 1; }
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2 || return 1
}
check "a bad reload is refused and traffic keeps flowing" bad_reload
check "a good reload is accepted" in_a "$WGMESH" "${API_A[@]}" reload

# BIRD: when A becomes the primary router of a subnet it advertises, the
# configured BIRD protocol is enabled through BIRD's control socket; when it
# stops being primary, the protocol is disabled again.
bird_protocol_state() {
    in_a birdc -s "$TMP/bird.ctl" show protocols tailnet | awk '$1 == "tailnet" { print $4 }'
}
bird_switch() {
    cat >"$TMP/bird.conf" <<CONF
router id 10.77.0.1;
protocol device {}
protocol static tailnet {
    disabled;
    ipv4;
    route 192.168.77.0/24 blackhole;
}
CONF
    ip netns exec "$NS_A" bird -f -c "$TMP/bird.conf" -s "$TMP/bird.ctl" -P "$TMP/bird.pid" &
    PIDS+=($!)
    for _ in $(seq 50); do [ -S "$TMP/bird.ctl" ] && break; sleep 0.1; done
    [ "$(bird_protocol_state)" = down ] || { echo "protocol not down at start"; return 1; }
    cp "$TMP/a.toml" "$TMP/a.nobird" || return 1
    sed -i 's#^mtu = 1280#mtu = 1280\nadvertised_routes = ["192.168.77.0/24"]\nprimary_routes = ["192.168.77.0/24"]#' "$TMP/a.toml" || return 1
    sed -i 's#^\[bird\]#[bird]\nprotocol = "tailnet"#' "$TMP/a.toml" || return 1
    in_a "$WGMESH" "${API_A[@]}" reload || return 1
    for _ in $(seq 30); do [ "$(bird_protocol_state)" = up ] && break; sleep 0.1; done
    [ "$(bird_protocol_state)" = up ] || { echo "protocol not up as primary"; return 1; }
    sed -i 's#^primary_routes = .*#primary_routes = []#' "$TMP/a.toml" || return 1
    in_a "$WGMESH" "${API_A[@]}" reload || return 1
    for _ in $(seq 30); do [ "$(bird_protocol_state)" = down ] && break; sleep 0.1; done
    [ "$(bird_protocol_state)" = down ] || { echo "protocol not down after primary"; return 1; }
    cp "$TMP/a.nobird" "$TMP/a.toml" || return 1
    in_a "$WGMESH" "${API_A[@]}" reload || return 1
}
if command -v bird >/dev/null && command -v birdc >/dev/null; then
    check "BIRD protocol follows the subnet-router state" bird_switch
fi

# A third node joins: it starts, and a reload of A adds it.
third_node() {
    start "$NS_C" c || return 1
    cat >>"$TMP/a.toml" <<CONF || return 1

[[peer]]
name = "node-c"
public_key = "$PUB_C"
disco_key = "$DPUB_C"
endpoints = ["10.77.0.3:51820"]
allowed_ips = ["100.64.0.3/32"]
CONF
    in_a "$WGMESH" "${API_A[@]}" reload || return 1
    in_a ip route show dev wgmA | grep -q 100.64.0.3 || return 1
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.3 || return 1
    in_c "$WGMESH" --socket "$TMP/state-c/wgmC.sock" ping --tsmp -c 3 100.64.0.1 || return 1
}
check "reload adds a third node" third_node

# A crash (SIGKILL) leaves resolv.conf rewritten; the next start restores the
# original from its backup, and a clean stop leaves the original in place.
crash_recovery() {
    grep -q "nameserver 100.100.100.100" "$TMP/resolv-c.conf" || return 1
    kill -KILL "${PID[c]}" || return 1
    for _ in $(seq 50); do kill -0 "${PID[c]}" 2>/dev/null || break; sleep 0.1; done
    grep -q "nameserver 100.100.100.100" "$TMP/resolv-c.conf" || return 1
    [ -e "$TMP/state-c/wgmC.state" ] && [ -e "$TMP/state-c/wgmC.resolv.bak" ] || return 1
    start "$NS_C" c || return 1
    grep -q "restoring resolv.conf left by a previous run" "$TMP/c.log" || return 1
    in_c ping -c 2 -i 0.2 -W 2 100.64.0.1 || return 1
    kill -TERM "${PID[c]}" || return 1
    for _ in $(seq 100); do kill -0 "${PID[c]}" 2>/dev/null || break; sleep 0.1; done
    [ "$(cat "$TMP/resolv-c.conf")" = "nameserver 192.0.2.53" ] || return 1
    [ ! -e "$TMP/state-c/wgmC.state" ] && [ ! -e "$TMP/state-c/wgmC.resolv.bak" ] || return 1
}
check "after a crash the next start restores resolv.conf and cleans up" crash_recovery

# C is down now but still A's peer: SYNs to it go unanswered. 300 of them
# from uid 65534 must not write 600 lines to A's log.
unanswered_syn_flood_is_rate_limited_in_the_log() {
    local before after lines
    before=$(wc -l <"$TMP/a.log")
    in_a "${AS_NOBODY[@]}" "$SYS_PYTHON" - <<'PY' || return 1
import socket
held = []
for port in range(20000, 20300):
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect(("100.64.0.3", port))
    except BlockingIOError:
        pass
    held.append(s)
import time; time.sleep(6.5)
PY
    sleep 1
    after=$(wc -l <"$TMP/a.log")
    lines=$(tail -n +"$((before + 1))" "$TMP/a.log" | grep -c "outbound connection" || true)
    echo "     ($lines 'outbound connection' lines for 300 unanswered SYNs; $((after - before)) lines in all)" >&3
    [ "$lines" -ge 1 ] || { echo "no connection failure logged at all"; return 1; }
    # Two callsites, 20 lines each per 10 s window (two windows at most here).
    [ "$lines" -le 80 ] || { echo "$lines lines"; return 1; }
}
check "unanswered_syn_flood_is_rate_limited_in_the_log" unanswered_syn_flood_is_rate_limited_in_the_log

# B restarts with a new disco key; once A's config carries the new key, A
# flushes the old session and traffic is back within a second.
restart_b() {
    kill -TERM "${PID[b]}" || return 1
    for _ in $(seq 100); do kill -0 "${PID[b]}" 2>/dev/null || break; sleep 0.1; done
    local disco2 dpub2 t0 t1 ms
    disco2=$("$WGMESH" genkey) && dpub2=$(echo "$disco2" | "$WGMESH" pubkey) || return 1
    sed -i "s#disco_private_key = \"$DISCO_B\"#disco_private_key = \"$disco2\"#" "$TMP/b.toml" || return 1
    start "$NS_B" b || return 1
    sed -i "s#disco_key = \"$DPUB_B\"#disco_key = \"$dpub2\"#" "$TMP/a.toml" || return 1
    t0=$(date +%s%N)
    in_a "$WGMESH" "${API_A[@]}" reload || return 1
    for _ in $(seq 20); do in_a ping -c 1 -W 1 100.64.0.2 >/dev/null && break; done
    t1=$(date +%s%N)
    ms=$(((t1 - t0) / 1000000))
    echo "     (recovered in ${ms} ms)" >&3
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2 || return 1
    [ "$ms" -lt 1000 ] || return 1
}
check "restart of B (new disco key) recovers within a second" restart_b

sigterm_cleanup() {
    kill -TERM "${PID[a]}" || return 1
    for _ in $(seq 100); do kill -0 "${PID[a]}" 2>/dev/null || break; sleep 0.1; done
    ! kill -0 "${PID[a]}" 2>/dev/null || { echo "still running"; return 1; }
    ! in_a ip link show wgmA 2>/dev/null || { echo "wgmA left behind"; return 1; }
    ! in_a ip route | grep -q 100.64.0.2 || { echo "route left behind"; return 1; }
    [ "$(cat "$TMP/resolv-a.conf")" = "nameserver 192.0.2.53" ] || { echo "resolv.conf not restored"; return 1; }
    [ ! -e "$TMP/state-a/wgmA.sock" ] && [ ! -e "$TMP/state-a/wgmA.state" ] || { echo "socket or state left"; return 1; }
}
check "SIGTERM removes routes, addresses and sockets, restores resolv.conf" sigterm_cleanup

# wgmeshd with nothing but an interface name, configured entirely by `wg set`
# and `ip`, like wireguard-go; node B still knows A's key and takes it back.
# configure_with_wg NS IFACE KEY MY_IP PEER_PUB PEER_UNDERLAY PEER_IP: a
# WireGuard interface set up only through `wg set` and `ip`, as an operator
# of any implementation would.
configure_with_wg() {
    local ns=$1 iface=$2
    echo "$3" >"$TMP/key-$iface" || return 1
    ip netns exec "$ns" wg set "$iface" private-key "$TMP/key-$iface" listen-port 51820 \
        peer "$5" endpoint "$6:51820" allowed-ips "$7/32" || return 1
    ip netns exec "$ns" ip addr add "$4/32" dev "$iface" || return 1
    ip netns exec "$ns" ip link set "$iface" up || return 1
    ip netns exec "$ns" ip route add "$7/32" dev "$iface" || return 1
}
uapi_only() {
    ip netns exec "$NS_A" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --interface wgmA \
        --state-dir "$TMP/state-a" >"$TMP/a2.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S /var/run/wireguard/wgmA.sock ] && break; sleep 0.1; done
    configure_with_wg "$NS_A" wgmA "$KEY_A" 100.64.0.1 "$PUB_B" 10.77.0.2 100.64.0.2 || return 1
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.2 || return 1
    in_a wg show wgmA | grep -q "public key: $PUB_A" || return 1
    in_a wg show wgmA dump | grep -q "^$PUB_B" || return 1
}
check "wgmeshd --interface configured by wg set and ip" uapi_only

# Faults at the edges of the daemon's life, in node C's namespace on an
# interface of their own: a UDP port held by another process at start is a
# clear error and a non-zero exit; deleting the TUN under a running daemon
# ends it cleanly with a clear error (wgmeshd exits, it does not recreate the
# device), after withdrawing what it had added.
fault_config() { # port: the config, on stdout
    cat <<EOF
[interface]
name = "wgmF"
private_key = "$KEY_C"
listen_port = $1
addresses = ["100.64.7.1/32"]
mtu = 1280

[dns]
mode = "off"
EOF
}
udp_port_taken() {
    fault_config 47001 >"$TMP/fault.toml" || return 1
    # check() runs us as an `if` condition, where `set -e` does not apply:
    # every assertion returns on failure explicitly.
    in_c python3 - "$WGMESHD" "$TMP/fault.toml" "$TMP/state-f1" <<'PY' || return 1
import socket, subprocess, sys
held = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
held.bind(("::", 47001))
run = subprocess.run([sys.argv[1], "--config", sys.argv[2], "--foreground", "--no-uapi",
                      "--state-dir", sys.argv[3]], capture_output=True, text=True, timeout=30)
print(run.stderr)
assert run.returncode != 0, "wgmeshd started on a taken port"
assert "UDP port 47001" in run.stderr and "in use" in run.stderr, run.stderr
PY
    ! in_c ip link show wgmF 2>/dev/null || { echo "wgmF left behind"; return 1; }
}
check "a UDP port taken at start is a clear error and a non-zero exit" udp_port_taken

tun_deleted() {
    fault_config 47002 >"$TMP/fault.toml" || return 1
    in_c "$WGMESHD" --config "$TMP/fault.toml" --foreground --no-uapi \
        --state-dir "$TMP/state-f2" >"$TMP/f2.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do in_c ip link show wgmF >/dev/null 2>&1 && break; sleep 0.1; done
    sleep 0.5
    in_c ip link del wgmF || return 1
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "still running"; return 1; fi
    local status=0
    wait "$pid" || status=$?
    [ "$status" != 0 ] || { echo "exit status 0"; return 1; }
    grep -q "TUN device failed" "$TMP/f2.log" || return 1
    grep -q "OS changes withdrawn" "$TMP/f2.log" || return 1
}
check "the TUN deleted under a running daemon: clear error, clean exit" tun_deleted

# The batched data plane (WGMESH_FASTPATH=1: TUN with IFF_VNET_HDR and
# TSO/USO offloads, GRO towards the kernel, UDP GSO sends and GRO receives)
# against the plain one and against itself, on nodes of its own on the same
# bridge: X (10.77.0.11) and Y (.12) batched, P (.13) plain; X peers with
# both. MTU 1420, WireGuard's usual (it leaves room for 80 bytes of IPv6, UDP
# and WireGuard headers in a 1500-byte link; the underlay here is IPv4). Every
# transfer is checked end to end by sha256, every UDP datagram by content,
# over the IPv4 and the IPv6 tunnel addresses.
FP_MTU=1420
FP_MB=${E2E_FASTPATH_MB:-50}
FP_T0=$(date +%s%N)
KEY_X=$("$WGMESH" genkey); PUB_X=$(echo "$KEY_X" | "$WGMESH" pubkey)
KEY_Y=$("$WGMESH" genkey); PUB_Y=$(echo "$KEY_Y" | "$WGMESH" pubkey)
KEY_P=$("$WGMESH" genkey); PUB_P=$(echo "$KEY_P" | "$WGMESH" pubkey)
DISCO_X=$("$WGMESH" genkey); DPUB_X=$(echo "$DISCO_X" | "$WGMESH" pubkey)
DISCO_Y=$("$WGMESH" genkey); DPUB_Y=$(echo "$DISCO_Y" | "$WGMESH" pubkey)
DISCO_P=$("$WGMESH" genkey); DPUB_P=$(echo "$DISCO_P" | "$WGMESH" pubkey)
add_ns x 11
add_ns y 12
add_ns p 13
write_config wgmX "$KEY_X" "$DISCO_X" 100.64.0.11 node-p "$PUB_P" "$DPUB_P" 100.64.0.13 10.77.0.13:51820 >"$TMP/x.toml"
peer_section node-y "$PUB_Y" "$DPUB_Y" 100.64.0.12 10.77.0.12:51820 >>"$TMP/x.toml"
write_config wgmY "$KEY_Y" "$DISCO_Y" 100.64.0.12 node-x "$PUB_X" "$DPUB_X" 100.64.0.11 10.77.0.11:51820 >"$TMP/y.toml"
write_config wgmP "$KEY_P" "$DISCO_P" 100.64.0.13 node-x "$PUB_X" "$DPUB_X" 100.64.0.11 10.77.0.11:51820 >"$TMP/p.toml"
for n in x y p; do
    sed -i "s/^mtu = 1280/mtu = $FP_MTU/" "$TMP/$n.toml"
    echo "nameserver 192.0.2.53" >"$TMP/resolv-$n.conf"
    mkdir -p "$TMP/state-$n"
done
head -c "${FP_MB}M" /dev/urandom >"$TMP/fp-blob"
FP_SHA=$(sha256sum <"$TMP/fp-blob" | cut -d' ' -f1)
FP_BYTES=$((FP_MB << 20))

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
wait_for_file() { # bounded (5 s)
    for _ in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.05; done
    echo "timed out waiting for $1"; return 1
}

fastpath_start() {
    start "$NS_X" x WGMESH_FASTPATH=1 || return 1
    # Y gets no data-plane environment: the batched plane is the default.
    start "$NS_Y" y || return 1
    start "$NS_P" p WGMESH_FASTPATH=0 WGMESH_DATA_PLANE_NICE=0 || return 1
    local n opt
    for n in x y; do
        for opt in "enabled: true" "tun_offload: true" "udp_gso: true" "udp_gro: true"; do
            grep "batched data plane" "$TMP/$n.log" | grep -q "$opt" || { echo "$n: no '$opt'"; return 1; }
        done
    done
    if grep -q "batched data plane" "$TMP/p.log"; then echo "p runs the fast path"; return 1; fi
    # Handshakes, both families, every pair both ways.
    in_ns "$NS_X" ping -c 2 -i 0.2 -W 2 100.64.0.13 || return 1
    in_ns "$NS_X" ping -c 2 -i 0.2 -W 2 100.64.0.12 || return 1
    in_ns "$NS_P" ping -6 -c 2 -i 0.2 -W 2 fd7a:115c:a1e0::11 || return 1
    in_ns "$NS_Y" ping -6 -c 2 -i 0.2 -W 2 fd7a:115c:a1e0::11 || return 1
}
check "fast path: X and Y (by default) start batched (TUN offloads, UDP GSO/GRO), P plain; all ping" fastpath_start

thread_nice() { # node: the nice value of its data-plane thread
    ps -L -o ni=,comm= -p "${PID[$1]}" | awk '$2 == "wgmesh-driver" {print $1}'
}
defaults() {
    # Y was started with no data-plane environment at all (and fastpath_start
    # checked that it runs batched with every offload).
    local nice
    nice=$(thread_nice y)
    [ "$nice" = -20 ] || { echo "y: data-plane thread at nice '$nice', want -20"; return 1; }
    nice=$(thread_nice p)
    [ "$nice" = 0 ] || { echo "p: data-plane thread at nice '$nice', want 0 (WGMESH_DATA_PLANE_NICE=0)"; return 1; }
}
check "defaults: the batched data plane, its thread at nice -20 (P asked for 0 and has it)" defaults

# TCP transfers of the blob, all at the same time; each argument is
# "SRC_NS DST_NS DST_ADDR". Every one must arrive whole, with its sha256.
tcp_transfers() {
    local src dst addr i n=$# failed=0 got t0 t1
    local -a recv=() send=() specs=("$@")
    rm -f "$TMP"/fp-got-* "$TMP"/fp-ready-*
    for i in $(seq 0 $((n - 1))); do
        read -r src dst addr <<<"${specs[$i]}"
        ip netns exec "$dst" timeout 60 python3 "$TRAFFIC" tcp-recv "$addr" $((5300 + i)) "$TMP/fp-got-$i" "$TMP/fp-ready-$i" &
        recv+=($!)
        PIDS+=($!)
    done
    for i in $(seq 0 $((n - 1))); do wait_for_file "$TMP/fp-ready-$i" || failed=1; done
    [ "$failed" = 0 ] || kill "${recv[@]}" 2>/dev/null
    t0=$(date +%s%N)
    if [ "$failed" = 0 ]; then
        for i in $(seq 0 $((n - 1))); do
            read -r src dst addr <<<"${specs[$i]}"
            ip netns exec "$src" timeout 60 python3 "$TRAFFIC" tcp-send "$addr" $((5300 + i)) "$TMP/fp-blob" &
            send+=($!)
            PIDS+=($!)
        done
    fi
    for i in "${!send[@]}"; do wait "${send[$i]}" || { echo "sender ${specs[$i]}: failed"; failed=1; }; done
    for i in "${!recv[@]}"; do wait "${recv[$i]}" || { echo "receiver ${specs[$i]}: failed"; failed=1; }; done
    t1=$(date +%s%N)
    for i in $(seq 0 $((n - 1))); do
        got=$(cat "$TMP/fp-got-$i" 2>/dev/null || true)
        if [ "$got" != "$FP_SHA $FP_BYTES" ]; then
            echo "${specs[$i]}: got '${got:-nothing}', want '$FP_SHA $FP_BYTES'"; failed=1
        fi
    done
    local what=()
    for i in $(seq 0 $((n - 1))); do
        read -r src dst addr <<<"${specs[$i]}"
        what+=("${src#wgm-e2e-}->${dst#wgm-e2e-} $addr")
    done
    echo "     ($n x $FP_MB MB in $(((t1 - t0) / 1000000)) ms: $(IFS=,; echo "${what[*]}" | sed 's/,/, /g'))" >&3
    [ "$failed" = 0 ]
}
check "fast path -> plain path: ${FP_MB} MB TCP over IPv4, sha256 matches" \
    tcp_transfers "$NS_X $NS_P 100.64.0.13"
check "plain path -> fast path: ${FP_MB} MB TCP over IPv4, sha256 matches" \
    tcp_transfers "$NS_P $NS_X 100.64.0.11"
check "fast path -> plain path: ${FP_MB} MB TCP over IPv6, sha256 matches" \
    tcp_transfers "$NS_X $NS_P fd7a:115c:a1e0::13"
check "plain path -> fast path: ${FP_MB} MB TCP over IPv6, sha256 matches" \
    tcp_transfers "$NS_P $NS_X fd7a:115c:a1e0::11"

# Byte and packet counters of X's TUN (tx: read by wgmeshd, rx: written by
# it) and of its veth (tx: UDP sent), one line.
x_counters() {
    local dev c
    for dev in wgmX veth-x; do
        for c in tx_bytes tx_packets rx_bytes rx_packets; do
            in_ns "$NS_X" cat "/sys/class/net/$dev/statistics/$c" || return 1
        done
    done | tr '\n' ' '
}
# The transfer fast <-> fast, and proof that the offloads were used rather
# than silently off: over it, X's TUN handed wgmeshd TSO superpackets (bytes
# per packet read above the MTU), wgmeshd wrote GRO-coalesced packets to it
# (bytes per packet written above the MTU) and X's UDP sends left as GSO
# runs (bytes per veth packet above the veth's 1500).
fast_fast_with_offloads() {
    local before after
    before=($(x_counters)) && [ "${#before[@]}" = 8 ] || { echo "no counters"; return 1; }
    tcp_transfers "$@" || return 1
    after=($(x_counters)) && [ "${#after[@]}" = 8 ] || { echo "no counters"; return 1; }
    local d=() i
    for i in $(seq 0 7); do d[i]=$((after[i] - before[i])); done
    local tun_read=$((d[0] / (d[1] + 1))) tun_written=$((d[2] / (d[3] + 1))) udp_sent=$((d[4] / (d[5] + 1)))
    echo "     (X: TUN read $tun_read B/packet, written $tun_written B/packet; UDP sent $udp_sent B/packet)" >&3
    echo "TUN read ${d[0]} B in ${d[1]}, written ${d[2]} B in ${d[3]}; veth sent ${d[4]} B in ${d[5]}"
    [ "$tun_read" -gt "$FP_MTU" ] || { echo "no TSO superpackets read from the TUN"; return 1; }
    [ "$tun_written" -gt "$FP_MTU" ] || { echo "no GRO-coalesced writes to the TUN"; return 1; }
    [ "$udp_sent" -gt 1500 ] || { echo "no UDP GSO sends"; return 1; }
}
check "fast path <-> fast path: ${FP_MB} MB TCP over IPv4 both ways, sha256 matches; TSO, GRO and UDP GSO in use" \
    fast_fast_with_offloads "$NS_X $NS_Y 100.64.0.12" "$NS_Y $NS_X 100.64.0.11"
check "fast path <-> fast path: ${FP_MB} MB TCP over IPv6 both ways, sha256 matches" \
    tcp_transfers "$NS_X $NS_Y fd7a:115c:a1e0::12" "$NS_Y $NS_X fd7a:115c:a1e0::11"
check "IPv4 and IPv6 TCP at the same time, fast -> fast and fast -> plain, sha256 matches" \
    tcp_transfers "$NS_X $NS_Y 100.64.0.12" "$NS_X $NS_Y fd7a:115c:a1e0::12" \
    "$NS_X $NS_P 100.64.0.13" "$NS_P $NS_X fd7a:115c:a1e0::11"

# Fair queueing (issue 17): a ping from X to Y while four TCP transfers run
# X -> Y over the batched path is not stuck behind their bursts. Bounded
# loosely so a busy machine cannot make it flake: the median loaded RTT
# stays under 20 x the idle one plus 20 ms (the real figure, about 2 x idle
# or better on an idle machine, comes from the throughput rig's -P 4 line).
# Meanwhile a UDP stream of long datagrams with short ones between goes the
# same way: Y hands short datagrams to its engine ahead of long ones, and
# must not reorder a flow's own packets doing so.
ping_during_four_flows() {
    local idle load pinger seq status=0
    idle=$(in_ns "$NS_X" ping -c 10 -i 0.1 -W 1 100.64.0.12 | grep -o 'time=[0-9.]*' | cut -d= -f2 | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    [ -n "$idle" ] || { echo "no idle ping"; return 1; }
    rm -f "$TMP/fp-seq-ready"
    ip netns exec "$NS_Y" timeout 30 python3 "$TRAFFIC" seq-recv 100.64.0.12 5401 4500 "$TMP/fp-seq-ready" >"$TMP/fp-seq" 2>&1 &
    seq=$!
    PIDS+=("$seq")
    wait_for_file "$TMP/fp-seq-ready" || { echo "no UDP receiver"; return 1; }
    (sleep 0.5; in_ns "$NS_X" ping -c 20 -i 0.1 -W 2 100.64.0.12 >"$TMP/fp-ping-load" 2>&1 || true) &
    pinger=$!
    PIDS+=("$pinger")
    (sleep 0.5; in_ns "$NS_X" timeout 20 python3 "$TRAFFIC" seq-send 100.64.0.12 5401 4500 || true) &
    PIDS+=("$!")
    tcp_transfers "$NS_X $NS_Y 100.64.0.12" "$NS_X $NS_Y 100.64.0.12" \
        "$NS_X $NS_Y 100.64.0.12" "$NS_X $NS_Y 100.64.0.12" || status=1
    wait "$pinger" 2>/dev/null || true
    wait "$seq" || { cat "$TMP/fp-seq"; status=1; }
    echo "     ($(head -1 "$TMP/fp-seq"))" >&3
    load=$(grep -o 'time=[0-9.]*' "$TMP/fp-ping-load" | cut -d= -f2 | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    [ -n "$load" ] || { echo "no ping answered during the transfer"; return 1; }
    echo "     (ping X -> Y: idle $idle ms, during 4 flows $load ms median)" >&3
    awk -v i="$idle" -v l="$load" 'BEGIN {exit !(l <= 20 * i + 20)}' \
        || { echo "loaded RTT $load ms vs idle $idle ms"; status=1; }
    return "$status"
}
check "fair queue: during four TCP transfers X -> Y a ping is answered without waiting behind them and a mixed-size UDP stream keeps its order" \
    ping_during_four_flows

# UDP datagrams of many sizes, each size a burst (what GSO and GRO batch):
# 1 byte, the largest that fits the tunnel MTU and one more (the kernel
# fragments it), fragmented datagrams up to 30000 bytes, and UDP_SEGMENT
# sends of the application (USO superpackets on a batched TUN; odd segment
# and tail sizes, for the checksums). Each must arrive intact and exactly
# once.
udp_spec() { # header bytes (28 for IPv4, 48 for IPv6)
    local max=$((FP_MTU - $1))
    echo "1x20,100x20,1000x20,${max}x20,$((max + 1))x20,8000x20,30000x5,g1000:20000,g999:9995,g${max}:$((10 * max + 101))"
}
udp_datagrams() { # SRC_NS DST_NS DST_ADDR header-bytes
    local spec recv status=0
    spec=$(udp_spec "$4")
    rm -f "$TMP/fp-udp-ready"
    ip netns exec "$2" timeout 20 python3 "$TRAFFIC" udp-recv "$3" 5400 "$spec" "$TMP/fp-udp-ready" &
    recv=$!
    PIDS+=("$recv")
    wait_for_file "$TMP/fp-udp-ready" || { status=1; kill "$recv" 2>/dev/null; }
    if [ "$status" = 0 ]; then
        in_ns "$1" timeout 20 python3 "$TRAFFIC" udp-send "$3" 5400 "$spec" || { echo "sender failed"; status=1; }
    fi
    wait "$recv" || status=1
    return "$status"
}
udp_between() { # NS_1 ADDR4_1 ADDR6_1 NS_2 ADDR4_2 ADDR6_2: both ways, both families
    udp_datagrams "$1" "$4" "$5" 28 || return 1
    udp_datagrams "$4" "$1" "$2" 28 || return 1
    udp_datagrams "$1" "$4" "$6" 48 || return 1
    udp_datagrams "$4" "$1" "$3" 48 || return 1
}
check "UDP of sizes 1 to 30000 and UDP_SEGMENT sends, fast <-> plain, IPv4 and IPv6: intact, exactly once" \
    udp_between "$NS_X" 100.64.0.11 fd7a:115c:a1e0::11 "$NS_P" 100.64.0.13 fd7a:115c:a1e0::13
check "UDP of sizes 1 to 30000 and UDP_SEGMENT sends, fast <-> fast, IPv4 and IPv6: intact, exactly once" \
    udp_between "$NS_X" 100.64.0.11 fd7a:115c:a1e0::11 "$NS_Y" 100.64.0.12 fd7a:115c:a1e0::12

# Path MTU: a ping of exactly the tunnel MTU with DF (IPv6 never fragments in
# transit) gets through in every direction; one byte more is refused by the
# sender's own kernel with "message too long" (on the batched TUN of X and the
# plain one of P), so nothing disappears in a black hole.
ping_mtu() { # -4|-6 SRC_NS DST_ADDR [too-long]
    local max out
    if [ "$1" = -4 ]; then max=$((FP_MTU - 28)); else max=$((FP_MTU - 48)); fi
    out=$(in_ns "$2" timeout 10 ping "$1" -M do -c 3 -i 0.2 -W 2 -s "$max" "$3" 2>&1) || { echo "$out"; return 1; }
    echo "$out" | grep -q " 0% packet loss" || { echo "$out"; return 1; }
    [ "${4:-}" = too-long ] || return 0
    if out=$(in_ns "$2" timeout 10 ping "$1" -M do -c 1 -W 1 -s $((max + 1)) "$3" 2>&1); then
        echo "$out"; echo "ping -s $((max + 1)) went through a $FP_MTU MTU"; return 1
    fi
    echo "$out" | grep -qi "message too long" || { echo "$out"; return 1; }
}
ping_mtu_all() { # -4|-6
    local x=100.64.0.11 y=100.64.0.12 p=100.64.0.13
    [ "$1" = -6 ] && { x=fd7a:115c:a1e0::11; y=fd7a:115c:a1e0::12; p=fd7a:115c:a1e0::13; }
    ping_mtu "$1" "$NS_X" "$p" too-long || return 1
    ping_mtu "$1" "$NS_P" "$x" too-long || return 1
    ping_mtu "$1" "$NS_X" "$y" || return 1
    ping_mtu "$1" "$NS_Y" "$x" || return 1
}
check "ping -M do at the tunnel MTU passes, one byte more is 'message too long' (IPv4, fast and plain)" ping_mtu_all -4
check "ping -M do at the tunnel MTU passes, one byte more is 'message too long' (IPv6, fast and plain)" ping_mtu_all -6

# The batched plane with a writer thread per device (WGMESH_FASTPATH_THREADS=1:
# the coalesced TUN writes and the GSO sends happen off the loop's thread):
# Y restarts with it, speaks first (X still holds the old session), and the
# transfers and UDP sizes above pass again, both ways.
writer_threads() {
    kill -TERM "${PID[y]}" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "${PID[y]}" 2>/dev/null || break; sleep 0.1; done
    start "$NS_Y" y WGMESH_FASTPATH_THREADS=1 || return 1
    grep "batched data plane" "$TMP/y.log" | grep -q "writer_threads: true" \
        || { echo "y: no writer threads"; return 1; }
    in_ns "$NS_Y" ping -c 2 -i 0.2 -W 2 100.64.0.11 || return 1
    tcp_transfers "$NS_X $NS_Y 100.64.0.12" "$NS_Y $NS_X fd7a:115c:a1e0::11" || return 1
    udp_datagrams "$NS_X" "$NS_Y" 100.64.0.12 28 || return 1
    udp_datagrams "$NS_Y" "$NS_X" fd7a:115c:a1e0::11 48 || return 1
}
check "fast path with writer threads (WGMESH_FASTPATH_THREADS=1): TCP both ways and UDP of every size, intact" \
    writer_threads

# After all of the above, the kernels of X, Y and P (each counts in its own
# namespace) found no bad TCP or UDP checksum in what wgmeshd wrote to them.
no_checksum_errors() {
    local ns counters
    for ns in "$NS_X" "$NS_Y" "$NS_P"; do
        counters=$(in_ns "$ns" nstat -az TcpInCsumErrors UdpInCsumErrors Udp6InCsumErrors TcpInErrs) || return 1
        [ "$(echo "$counters" | grep -cE '^(Tcp|Udp|Udp6)In(Csum)?Err')" = 4 ] \
            || { echo "$ns: nstat did not report the four counters: $counters"; return 1; }
        echo "$counters" | awk 'NR > 1 && $2 != 0 {bad = 1} END {exit bad}' \
            || { echo "$ns: $counters"; return 1; }
    done
}
check "no TCP or UDP checksum errors in the fast and plain nodes' kernels" no_checksum_errors

for n in x y p; do kill -TERM "${PID[$n]:-}" 2>/dev/null || true; done
for n in x y p; do
    for _ in $(seq 100); do kill -0 "${PID[$n]:-}" 2>/dev/null || break; sleep 0.1; done
done
echo "     (fast-path checks: $((($(date +%s%N) - FP_T0) / 1000000)) ms)"

# Interop: node B becomes a WireGuard implementation we did not write
# (Debian's wireguard-go, then boringtun-cli), configured with wg; the wgmeshd
# on A (configured by wg set above) talks to it both ways.
BORINGTUN=${BORINGTUN_CLI:-$(command -v boringtun-cli || true)}
if [ -z "$BORINGTUN" ] && [ -x "$HOME/.cache/wgmesh-bench/boringtun/bin/boringtun-cli" ]; then
    BORINGTUN=$HOME/.cache/wgmesh-bench/boringtun/bin/boringtun-cli
fi
B_PID=${PID[b]}
interop_with() { # command to run node B's interface wgmB in the foreground
    kill -TERM "$B_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$B_PID" 2>/dev/null || break; sleep 0.1; done
    for _ in $(seq 50); do in_b ip link show wgmB >/dev/null 2>&1 || break; sleep 0.1; done
    rm -f /var/run/wireguard/wgmB.sock
    ip netns exec "$NS_B" "$@" >"$TMP/interop.log" 2>&1 &
    B_PID=$!
    PIDS+=("$B_PID")
    for _ in $(seq 100); do [ -S /var/run/wireguard/wgmB.sock ] && break; sleep 0.1; done
    configure_with_wg "$NS_B" wgmB "$KEY_B" 100.64.0.2 "$PUB_A" 10.77.0.1 100.64.0.1 || return 1
    # B first: A still holds a session with the B that was just replaced, and
    # as in any WireGuard, what A sends on it is dropped until B's handshake
    # (or A's own after 15 s without an answer) replaces it.
    in_b ping -c 3 -i 0.2 -W 2 100.64.0.1 || return 1
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.2 || return 1
    tcp_transfer || return 1
}
if command -v wireguard-go >/dev/null && command -v wg >/dev/null; then
    check "interop with wireguard-go: ping both ways and a TCP transfer" \
        interop_with wireguard-go -f wgmB
fi
if [ -n "$BORINGTUN" ] && command -v wg >/dev/null; then
    check "interop with boringtun-cli: ping both ways and a TCP transfer" \
        interop_with env WG_SUDO=1 "$BORINGTUN" --foreground --threads 1 \
        --disable-drop-privileges --log "$TMP/boringtun.log" wgmB
else
    echo "skip interop with boringtun-cli (not installed; set BORINGTUN_CLI)"
fi

if [ "$FAILED" != 0 ]; then
    for n in a b c a2 x y p; do [ -f "$TMP/$n.log" ] || continue; echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-40}" "$TMP/$n.log"; done
fi
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
