#!/usr/bin/env bash
# End-to-end test of wgmeshd on Linux: three network namespaces joined by
# veth pairs to a bridge (in a fourth), one daemon in each, real TUN devices,
# netlink routes, the CLI, `wg`, and Debian's wireguard-go for interop.
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
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    ip netns del "$NS_C" 2>/dev/null || true
    ip netns del "$NS_BR" 2>/dev/null || true
    rm -f /var/run/wireguard/wgmA.sock /var/run/wireguard/wgmB.sock /var/run/wireguard/wgmC.sock
    rm -rf "$TMP"
}
trap cleanup EXIT
# Notes for the reader go to fd 3, which check() does not capture.
exec 3>&1
trap "exit 130" INT TERM

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

# The network: 10.77.0.1, .2 and .3 on one bridge. Namespaces left by an
# aborted earlier run of this script are removed first.
for ns in "$NS_A" "$NS_B" "$NS_C" "$NS_BR"; do ip netns del "$ns" 2>/dev/null || true; done
ip netns add "$NS_BR"
ip -n "$NS_BR" link add br0 type bridge
ip -n "$NS_BR" link set br0 up
i=1
for x in a b c; do
    ns="wgm-e2e-$x"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "veth-$x" netns "$ns" type veth peer name "br-$x" netns "$NS_BR"
    ip -n "$NS_BR" link set "br-$x" master br0 up
    ip -n "$ns" addr add "10.77.0.$i/24" dev "veth-$x"
    ip -n "$ns" link set "veth-$x" up
    i=$((i + 1))
done

KEY_A=$("$WGMESH" genkey); PUB_A=$(echo "$KEY_A" | "$WGMESH" pubkey)
KEY_B=$("$WGMESH" genkey); PUB_B=$(echo "$KEY_B" | "$WGMESH" pubkey)
DISCO_A=$("$WGMESH" genkey); DPUB_A=$(echo "$DISCO_A" | "$WGMESH" pubkey)
DISCO_B=$("$WGMESH" genkey); DPUB_B=$(echo "$DISCO_B" | "$WGMESH" pubkey)
KEY_C=$("$WGMESH" genkey); PUB_C=$(echo "$KEY_C" | "$WGMESH" pubkey)
DISCO_C=$("$WGMESH" genkey); DPUB_C=$(echo "$DISCO_C" | "$WGMESH" pubkey)

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
nameservers = ["100.100.100.100"]
search_domains = ["tail.e2e"]

[[peer]]
name = "$5"
public_key = "$6"
disco_key = "$7"
endpoints = ["$9"]
allowed_ips = ["$8/32", "fd7a:115c:a1e0::${8##*.}/128"]
CONF
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

start() { # ns name
    local ns=$1 n=$2
    ip netns exec "$ns" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
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
    sed 's#"100.64.0.1/32"#"100.64.0.1/40"#' "$TMP/a.toml" >"$TMP/bad.toml"
    if "$WGMESHD" --check --config "$TMP/bad.toml" 2>"$TMP/err"; then return 1; fi
    grep -q "bad.toml:6:.*interface.addresses" "$TMP/err"
}
check "bad config is refused with file, line and field" bad_config

check "route and address applied" in_a sh -c "ip addr show wgmA | grep -q 100.64.0.1/32 && ip route show dev wgmA | grep -q 100.64.0.2"
check "resolv.conf written" grep -q "nameserver 100.100.100.100" "$TMP/resolv-a.conf"
check "kernel ping across the tunnel" in_a ping -c 3 -i 0.2 -W 2 100.64.0.2
check "kernel ping across the tunnel over IPv6" in_a ping -6 -c 3 -i 0.2 -W 2 fd7a:115c:a1e0::2
check "wgmesh ping --tsmp over IPv6" in_a "$WGMESH" "${API_A[@]}" ping --tsmp -c 3 fd7a:115c:a1e0::2
check "wgmesh ping --tsmp" in_a "$WGMESH" "${API_A[@]}" ping --tsmp -c 3 100.64.0.2
check "wgmesh ping --icmp" in_a "$WGMESH" "${API_A[@]}" ping --icmp -c 3 100.64.0.2
check "wgmesh ping --disco" in_a "$WGMESH" "${API_A[@]}" ping --disco -c 5 100.64.0.2

status_json() {
    "$WGMESH" "${API_A[@]}" status --json >"$TMP/status.json"
    python3 - "$TMP/status.json" <<'PY'
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
    in_a python3 - <<'PY'
import urllib.request
body = urllib.request.urlopen("http://127.0.0.1:9101/metrics", timeout=5).read().decode()
assert 'wgmesh_handshakes_completed{interface="wgmA"}' in body, body[:300]
assert "wgmesh_peer_rx_bytes{" in body
PY
}
check "Prometheus metrics over HTTP on loopback" metrics_http

# A new default route in A's namespace is a major link change: the engine
# counts it, rebinds its socket, and traffic keeps flowing.
link_change() {
    counter() {
        "$WGMESH" "${API_A[@]}" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["counters"]["link_changes_major"])'
    }
    local before after
    before=$(counter)
    in_a ip route add default via 10.77.0.254 dev veth-a
    after=$before
    for _ in $(seq 30); do after=$(counter); [ "$after" -gt "$before" ] && break; sleep 0.1; done
    in_a ip route del default via 10.77.0.254 dev veth-a
    [ "$after" -gt "$before" ]
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2
}
check "a default-route change is a major link change; traffic survives the rebind" link_change
check "wgmesh metrics" sh -c "'$WGMESH' ${API_A[*]} metrics | grep -q '^wgmesh_handshakes_completed{interface=\"wgmA\"} [1-9]'"

SIZE_MB=${E2E_TRANSFER_MB:-100}
tcp_transfer() {
    head -c "${SIZE_MB}M" /dev/urandom >"$TMP/blob"
    local want; want=$(sha256sum <"$TMP/blob" | cut -d' ' -f1)
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
    in_a timeout 120 python3 - "$TMP/blob" <<'PY'
import socket, sys
s = socket.create_connection(("100.64.0.2", 5201), timeout=30)
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(1 << 16):
        s.sendall(chunk)
s.close()
PY
    wait "$server"
    [ "$(cat "$TMP/got")" = "$want" ]
}
check "TCP transfer of ${SIZE_MB} MB with matching checksum" tcp_transfer

flow_log() {
    sleep 1.5
    python3 - "$TMP/flows.jsonl" "$SIZE_MB" <<'PY'
import json, sys
flows = [json.loads(l) for l in open(sys.argv[1])]
tcp = [f for f in flows if f["proto"] == 6 and f["dst"] == "100.64.0.2:5201" and f["direction"] == "out"]
sent = sum(f["bytes"] for f in tcp)
assert sent >= int(sys.argv[2]) << 20, (sent, tcp[:3])
assert all(f["peer"] for f in tcp), tcp[:3]
assert any(f["proto"] == 1 and f["direction"] == "in" for f in flows), "no ICMP replies logged"
PY
}
check "flow log has the TCP transfer and the pings, per peer" flow_log

capture_pcap() {
    in_a "$WGMESH" "${API_A[@]}" capture -o "$TMP/cap.pcap" --seconds 3 &
    local cap=$!
    sleep 0.5
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.2
    wait "$cap"
    python3 - "$TMP/cap.pcap" <<'PY'
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

if command -v wg >/dev/null; then
    check "wg show lists the peer" sh -c "wg show wgmA | grep -q 'peer: $PUB_B' && wg show wgmA | grep -q 'latest handshake'"
fi

bad_reload() {
    cp "$TMP/a.toml" "$TMP/a.good"
    sed -i 's/listen_port = 51820/listen_port = 99999/' "$TMP/a.toml"
    if in_a "$WGMESH" "${API_A[@]}" reload 2>"$TMP/err"; then return 1; fi
    grep -q "a.toml:5" "$TMP/err"
    cp "$TMP/a.good" "$TMP/a.toml"
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2
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
    [ "$(bird_protocol_state)" = down ]
    cp "$TMP/a.toml" "$TMP/a.nobird"
    sed -i 's#^mtu = 1280#mtu = 1280\nadvertised_routes = ["192.168.77.0/24"]\nprimary_routes = ["192.168.77.0/24"]#' "$TMP/a.toml"
    sed -i 's#^\[bird\]#[bird]\nprotocol = "tailnet"#' "$TMP/a.toml"
    in_a "$WGMESH" "${API_A[@]}" reload
    for _ in $(seq 30); do [ "$(bird_protocol_state)" = up ] && break; sleep 0.1; done
    [ "$(bird_protocol_state)" = up ]
    sed -i 's#^primary_routes = .*#primary_routes = []#' "$TMP/a.toml"
    in_a "$WGMESH" "${API_A[@]}" reload
    for _ in $(seq 30); do [ "$(bird_protocol_state)" = down ] && break; sleep 0.1; done
    [ "$(bird_protocol_state)" = down ]
    cp "$TMP/a.nobird" "$TMP/a.toml"
    in_a "$WGMESH" "${API_A[@]}" reload
}
if command -v bird >/dev/null && command -v birdc >/dev/null; then
    check "BIRD protocol follows the subnet-router state" bird_switch
fi

# A third node joins: it starts, and a reload of A adds it.
third_node() {
    start "$NS_C" c
    cat >>"$TMP/a.toml" <<CONF

[[peer]]
name = "node-c"
public_key = "$PUB_C"
disco_key = "$DPUB_C"
endpoints = ["10.77.0.3:51820"]
allowed_ips = ["100.64.0.3/32"]
CONF
    in_a "$WGMESH" "${API_A[@]}" reload
    in_a ip route show dev wgmA | grep -q 100.64.0.3
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.3
    in_c "$WGMESH" --socket "$TMP/state-c/wgmC.sock" ping --tsmp -c 3 100.64.0.1
}
check "reload adds a third node" third_node

# A crash (SIGKILL) leaves resolv.conf rewritten; the next start restores the
# original from its backup, and a clean stop leaves the original in place.
crash_recovery() {
    grep -q "nameserver 100.100.100.100" "$TMP/resolv-c.conf"
    kill -KILL "${PID[c]}"
    for _ in $(seq 50); do kill -0 "${PID[c]}" 2>/dev/null || break; sleep 0.1; done
    grep -q "nameserver 100.100.100.100" "$TMP/resolv-c.conf"
    [ -e "$TMP/state-c/wgmC.state" ] && [ -e "$TMP/state-c/wgmC.resolv.bak" ]
    start "$NS_C" c
    grep -q "restoring resolv.conf left by a previous run" "$TMP/c.log"
    in_c ping -c 2 -i 0.2 -W 2 100.64.0.1
    kill -TERM "${PID[c]}"
    for _ in $(seq 100); do kill -0 "${PID[c]}" 2>/dev/null || break; sleep 0.1; done
    [ "$(cat "$TMP/resolv-c.conf")" = "nameserver 192.0.2.53" ]
    [ ! -e "$TMP/state-c/wgmC.state" ] && [ ! -e "$TMP/state-c/wgmC.resolv.bak" ]
}
check "after a crash the next start restores resolv.conf and cleans up" crash_recovery

# B restarts with a new disco key; once A's config carries the new key, A
# flushes the old session and traffic is back within a second.
restart_b() {
    kill -TERM "${PID[b]}"
    for _ in $(seq 100); do kill -0 "${PID[b]}" 2>/dev/null || break; sleep 0.1; done
    local disco2 dpub2 t0 t1 ms
    disco2=$("$WGMESH" genkey); dpub2=$(echo "$disco2" | "$WGMESH" pubkey)
    sed -i "s#disco_private_key = \"$DISCO_B\"#disco_private_key = \"$disco2\"#" "$TMP/b.toml"
    start "$NS_B" b
    sed -i "s#disco_key = \"$DPUB_B\"#disco_key = \"$dpub2\"#" "$TMP/a.toml"
    t0=$(date +%s%N)
    in_a "$WGMESH" "${API_A[@]}" reload
    for _ in $(seq 20); do in_a ping -c 1 -W 1 100.64.0.2 >/dev/null && break; done
    t1=$(date +%s%N)
    ms=$(((t1 - t0) / 1000000))
    echo "     (recovered in ${ms} ms)" >&3
    in_a ping -c 2 -i 0.2 -W 2 100.64.0.2
    [ "$ms" -lt 1000 ]
}
check "restart of B (new disco key) recovers within a second" restart_b

sigterm_cleanup() {
    kill -TERM "${PID[a]}"
    for _ in $(seq 100); do kill -0 "${PID[a]}" 2>/dev/null || break; sleep 0.1; done
    ! kill -0 "${PID[a]}" 2>/dev/null
    ! in_a ip link show wgmA 2>/dev/null
    ! in_a ip route | grep -q 100.64.0.2
    [ "$(cat "$TMP/resolv-a.conf")" = "nameserver 192.0.2.53" ]
    [ ! -e "$TMP/state-a/wgmA.sock" ] && [ ! -e "$TMP/state-a/wgmA.state" ]
}
check "SIGTERM removes routes, addresses and sockets, restores resolv.conf" sigterm_cleanup

# wgmeshd with nothing but an interface name, configured entirely by `wg set`
# and `ip`, like wireguard-go; node B still knows A's key and takes it back.
uapi_only() {
    ip netns exec "$NS_A" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --interface wgmA \
        --state-dir "$TMP/state-a" >"$TMP/a2.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S /var/run/wireguard/wgmA.sock ] && break; sleep 0.1; done
    echo "$KEY_A" >"$TMP/key-a"
    in_a wg set wgmA private-key "$TMP/key-a" listen-port 51820 \
        peer "$PUB_B" endpoint 10.77.0.2:51820 allowed-ips 100.64.0.2/32
    in_a ip addr add 100.64.0.1/32 dev wgmA
    in_a ip link set wgmA up
    in_a ip route add 100.64.0.2/32 dev wgmA
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.2
    in_a wg show wgmA | grep -q "public key: $PUB_A"
    in_a wg show wgmA dump | grep -q "^$PUB_B"
}
check "wgmeshd --interface configured by wg set and ip" uapi_only

# Faults at the edges of the daemon's life, in node C's namespace on an
# interface of their own: a UDP port held by another process at start is a
# clear error and a non-zero exit; deleting the TUN under a running daemon
# ends it cleanly with a clear error (wgmeshd exits, it does not recreate the
# device), after withdrawing what it had added.
fault_config() {
    cat >"$TMP/fault.toml" <<EOF
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
    fault_config 47001
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
    ! in_c ip link show wgmF 2>/dev/null
}
check "a UDP port taken at start is a clear error and a non-zero exit" udp_port_taken

tun_deleted() {
    fault_config 47002
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
    grep -q "OS changes withdrawn" "$TMP/f2.log"
}
check "the TUN deleted under a running daemon: clear error, clean exit" tun_deleted

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
    echo "$KEY_B" >"$TMP/key-b"
    in_b wg set wgmB private-key "$TMP/key-b" listen-port 51820 \
        peer "$PUB_A" endpoint 10.77.0.1:51820 allowed-ips 100.64.0.1/32
    in_b ip addr add 100.64.0.2/32 dev wgmB
    in_b ip link set wgmB up
    in_b ip route add 100.64.0.1/32 dev wgmB
    in_a ping -c 3 -i 0.2 -W 2 100.64.0.2
    in_b ping -c 3 -i 0.2 -W 2 100.64.0.1
    tcp_transfer
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
    for n in a b c a2; do [ -f "$TMP/$n.log" ] || continue; echo "--- wgmeshd $n log (tail)"; tail -n "${E2E_LOG_LINES:-40}" "$TMP/$n.log"; done
fi
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
