#!/usr/bin/env bash
# End-to-end test of a tailnet run by the coordination server: wgmesh-control
# (SQLite) in one network namespace, three wgmeshd nodes in three more, all
# on one bridge. The nodes join with auth keys and find each other with no
# hand-written peer list; a node killed with -9 and restarted is reachable
# again within a second with no config edit (the server pushes its new disco
# key, the others flush its old session); the server restarting stops no
# traffic and the nodes reconnect; a policy that forbids B->C port 22 blocks
# it with a TSMP reject B's pending-open diagnostics report, and allows the
# rest; then (when PostgreSQL is installed) two replicas on one PostgreSQL
# database, one of them killed while the nodes fail over to the other.
# Needs root and iproute2. Everything it creates it deletes on exit, also on
# failure. Every wait is bounded.
# Usage: adapters/tests/e2e-control.sh [BIN_DIR]
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
CONTROL=$(realpath "$BIN/wgmesh-control")
NS_S=wgm-ctl-s
NS_A=wgm-ctl-a
NS_B=wgm-ctl-b
NS_C=wgm-ctl-c
NS_BR=wgm-ctl-br
ALL_NS=("$NS_S" "$NS_A" "$NS_B" "$NS_C" "$NS_BR")
umask 077
TMP=$(mktemp -d /tmp/wgmesh-e2e-ctl.XXXXXX)
PASSED=0
FAILED=0
SKIPPED=0
PIDS=()
declare -A PID
PG_DIR=""

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
    echo "e2e-control: needs root and iproute2; skipping"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ -n "$PG_DIR" ] && [ -d "$PG_DIR" ]; then
        su postgres -c "$PG_BIN/pg_ctl -D '$PG_DIR/data' -m immediate stop" >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
    for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
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
skip() { SKIPPED=$((SKIPPED + 1)); echo "skip $1: $2"; }

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# The network: the server at 10.78.0.10, nodes A, B, C at .1, .2, .3.
for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
ip netns add "$NS_BR"
ip -n "$NS_BR" link add br0 type bridge
ip -n "$NS_BR" link set br0 up
add_ns() { # x octet
    local x=$1 ns="wgm-ctl-$1"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "veth-$x" netns "$ns" type veth peer name "br-$x" netns "$NS_BR"
    ip -n "$NS_BR" link set "br-$x" master br0 up
    ip -n "$ns" addr add "10.78.0.$2/24" dev "veth-$x"
    ip -n "$ns" link set "veth-$x" up
}
add_ns s 10
add_ns a 1
add_ns b 2
add_ns c 3

ADMIN=(--admin-socket "$TMP/admin.sock")
cat >"$TMP/policy.toml" <<'POLICY'
[[acls]]
action = "accept"
src = ["*"]
dst = ["*:*"]
POLICY

start_server() { # name db listen [admin socket]
    local name=$1 db=$2 listen=$3 admin=${4:-$TMP/admin.sock}
    # `ip netns exec` directly, not a shell function: $! must be the
    # server's own PID, so that kill -9 kills it.
    ip netns exec "$NS_S" env RUST_LOG="${E2E_LOG:-info}" "$CONTROL" --admin-socket "$admin" serve \
        --listen "$listen" --db "$db" --policy "$TMP/policy.toml" \
        --key-file "$TMP/server.key" --tailnet-name ctl.e2e --keepalive-secs 5 \
        >>"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    PID[$name]=$!
    for _ in $(seq 100); do
        [ -S "$admin" ] && in_ns "$NS_S" ss -Hltn "sport = :${listen##*:}" | grep -q LISTEN && return 0
        kill -0 "${PID[$name]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "wgmesh-control $name did not start"; cat "$TMP/$name.log"; return 1
}

write_node_config() { # n authkey urls...
    local n=$1 auth=$2; shift 2
    local urls
    urls=$(printf '"%s", ' "$@"); urls="[${urls%, }]"
    cat >"$TMP/$n.toml" <<CONF
[interface]
name = "wgc${n^^}"
listen_port = 51820
mtu = 1280

[dns]
mode = "off"

[control]
url = $urls
server_public_key = "$SERVER_KEY"
auth_key = "$auth"
state_dir = "$TMP/node-$n"
hostname = "node-$n"

[flowlog]
path = "$TMP/flows-$n.jsonl"
interval_secs = 1
CONF
}

start_node() { # n
    local n=$1 ns="wgm-ctl-$1"
    mkdir -p "$TMP/state-$n"
    ip netns exec "$ns" env RUST_LOG="${E2E_LOG:-info}" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" --no-uapi >>"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
    PID[$n]=$!
    for _ in $(seq 100); do [ -S "$TMP/state-$n/wgc${n^^}.sock" ] && return 0; sleep 0.05; done
    echo "wgmeshd $n did not start"; cat "$TMP/$n.log"; return 1
}

api() { local n=$1; shift; "$WGMESH" --socket "$TMP/state-$n/wgc${n^^}.sock" "$@"; }

# The tailnet address of node n (from its own status), empty until it has one.
addr_of() {
    api "$1" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
v4 = [a.split("/")[0] for a in s["local_addrs"] if ":" not in a]
print(v4[0] if v4 else "")' 2>/dev/null || true
}

# Waits until node n's status says connected with a netmap of `peers` peers.
wait_connected() { # n peers [tries of 0.1 s]
    local n=$1 peers=$2 tries=${3:-150}
    for _ in $(seq "$tries"); do
        api "$n" status --json 2>/dev/null | python3 -c '
import json, sys
c = json.load(sys.stdin).get("control") or {}
sys.exit(0 if c.get("connected") and c.get("netmap_seq") is not None and c.get("peers") == int(sys.argv[1]) else 1)' "$peers" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "node $n not connected with $peers peers:"; api "$n" status 2>&1 | head -5; return 1
}

# Pings until one answer or the tries are spent (0.2 s each).
ping_until() { # from-ns addr tries
    local ns=$1 addr=$2 tries=$3
    for _ in $(seq "$tries"); do
        in_ns "$ns" ping -c 1 -W 0.2 "$addr" >/dev/null 2>&1 && return 0
    done
    return 1
}

SERVER_KEY=$("$CONTROL" key show --key-file "$TMP/server.key")
start_server server "sqlite:$TMP/control.db" 10.78.0.10:8080
URL=http://10.78.0.10:8080
for n in a b c; do
    auth=$("$CONTROL" "${ADMIN[@]}" authkey create --tag "tag:$n")
    write_node_config "$n" "$auth" "$URL"
done

config_mixing_static_peers_is_refused() {
    cp "$TMP/a.toml" "$TMP/mixed.toml" || return 1
    printf '\n[[peer]]\nname = "x"\npublic_key = "%s"\nallowed_ips = ["100.64.9.9/32"]\n' "$SERVER_KEY" >>"$TMP/mixed.toml"
    if "$WGMESHD" --check --config "$TMP/mixed.toml" 2>"$TMP/err"; then return 1; fi
    cat "$TMP/err"
    grep -q "mixed.toml:.*static peers and \[control\] cannot be combined" "$TMP/err" || return 1
}
check "a config with static peers and [control] is refused" config_mixing_static_peers_is_refused

three_nodes_join() {
    start_node a || return 1
    start_node b || return 1
    start_node c || return 1
    wait_connected a 2 && wait_connected b 2 && wait_connected c 2 || return 1
    local key_mode
    key_mode=$(stat -c %a "$TMP/node-a/node.key") || return 1
    [ "$key_mode" = 600 ] || { echo "node key mode $key_mode"; return 1; }
}
check "three nodes join with auth keys (node key stored 0600)" three_nodes_join

ADDR_A=$(addr_of a); ADDR_B=$(addr_of b); ADDR_C=$(addr_of c)
echo "     tailnet addresses: A=$ADDR_A B=$ADDR_B C=$ADDR_C"

all_reach_each_other() {
    [ -n "$ADDR_A" ] && [ -n "$ADDR_B" ] && [ -n "$ADDR_C" ] || return 1
    ping_until "$NS_A" "$ADDR_B" 25 || { echo "A->B"; return 1; }
    ping_until "$NS_A" "$ADDR_C" 25 || { echo "A->C"; return 1; }
    ping_until "$NS_B" "$ADDR_C" 25 || { echo "B->C"; return 1; }
    ping_until "$NS_C" "$ADDR_A" 25 || { echo "C->A"; return 1; }
    ! grep -q "\[\[peer\]\]" "$TMP/a.toml" "$TMP/b.toml" "$TMP/c.toml" || return 1
}
check "every node reaches every other (no peer list written)" all_reach_each_other

status_shows_control() {
    api a status | grep -E "control $URL +connected +netmap seq [0-9]+ +last push [0-9.]+s ago +peers 2" || { api a status; return 1; }
    api a status --json | python3 -c '
import json, sys
c = json.load(sys.stdin)["control"]
assert c["connected"] and c["url"] == sys.argv[1] and c["secs_since_push"] is not None, c' "$URL" || return 1
}
check "wgmesh status shows the control state" status_shows_control

RECOVERY_MS=""
restart_recovers_within_a_second() {
    kill -KILL "${PID[c]}" || return 1
    wait "${PID[c]}" 2>/dev/null || true
    local t0 t1 t2
    t0=$(date +%s%N)
    start_node c || return 1
    t1=$(date +%s%N)
    ping_until "$NS_A" "$ADDR_C" 50 || { echo "A never reached the restarted C"; tail -20 "$TMP/c.log"; return 1; }
    t2=$(date +%s%N)
    RECOVERY_MS=$(((t2 - t1) / 1000000))
    echo "restart: daemon up after $(((t1 - t0) / 1000000)) ms, A's traffic to C back $RECOVERY_MS ms after that" >&2
    echo "     recovery: C's daemon up $(((t1 - t0) / 1000000)) ms after kill -9 + restart; A->C traffic recovered $RECOVERY_MS ms later"
    [ "$RECOVERY_MS" -lt 1000 ] || return 1
    ping_until "$NS_B" "$ADDR_C" 5 || { echo "B->C"; return 1; }
    grep -q "sessions_flushed" <(api a metrics) || return 1
    api a metrics | grep -E "^wgmesh_sessions_flushed.* [1-9]" || { echo "no session flushed on A"; return 1; }
}
check "kill -9 and restart of C: A reaches it again in under 1 s, no config edit" restart_recovers_within_a_second
[ -n "$RECOVERY_MS" ] && echo "     measured recovery time: ${RECOVERY_MS} ms"

server_restart_keeps_traffic() {
    # Pings every 0.1 s through the outage: the data plane does not need
    # the server.
    ip netns exec "$NS_A" ping -c 40 -i 0.1 -W 1 "$ADDR_B" >"$TMP/ping-outage" 2>&1 &
    local ping=$!
    sleep 0.5
    kill -KILL "${PID[server]}" || return 1
    wait "${PID[server]}" 2>/dev/null || true
    sleep 2
    start_server server "sqlite:$TMP/control.db" 10.78.0.10:8080 || return 1
    wait "$ping" || true
    cat "$TMP/ping-outage" | tail -3
    grep -qE " 0% packet loss" "$TMP/ping-outage" || return 1
    wait_connected a 2 200 && wait_connected b 2 200 && wait_connected c 2 200 || return 1
    ping_until "$NS_C" "$ADDR_B" 10 || return 1
}
check "server kill and restart: traffic keeps flowing, nodes reconnect" server_restart_keeps_traffic

policy_blocks_b_to_c_ssh() {
    cat >"$TMP/policy.toml" <<'POLICY'
[[acls]]
action = "accept"
src = ["tag:a", "tag:c"]
dst = ["*:*"]

[[acls]]
action = "accept"
src = ["tag:b"]
dst = ["tag:a:*", "tag:c:1-21,23-65535"]

[[acls]]
action = "accept"
src = ["tag:b"]
dst = ["tag:c:*"]
proto = "icmp"
POLICY
    "$CONTROL" "${ADMIN[@]}" policy reload || return 1
    sleep 1
    # A listener on C port 22 and 2222 (python, bounded).
    ip netns exec "$NS_C" timeout 20 python3 -c '
import socket, threading
def serve(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8)
    while True:
        c, _ = s.accept(); c.sendall(b"hello\n"); c.close()
for p in (22, 2222):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
threading.Event().wait(19)
' &
    PIDS+=($!)
    sleep 0.5
    local connect='
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(s.recv(16).decode().strip())'
    in_ns "$NS_B" python3 -c "$connect" "$ADDR_C" 2222 3 | grep -q hello || { echo "B->C:2222 refused"; return 1; }
    in_ns "$NS_A" python3 -c "$connect" "$ADDR_C" 22 3 | grep -q hello || { echo "A->C:22 refused"; return 1; }
    if in_ns "$NS_B" python3 -c "$connect" "$ADDR_C" 22 7 2>/dev/null; then
        echo "B reached C:22"; return 1
    fi
    ping_until "$NS_B" "$ADDR_C" 5 || { echo "B->C ping"; return 1; }
    # B's engine got C's TSMP reject and its pending-open diagnostics say so.
    for _ in $(seq 30); do
        grep -q "PeerRejected" "$TMP/b.log" && break
        sleep 0.2
    done
    grep "outbound connection got no answer" "$TMP/b.log" | grep "PeerRejected" | grep ":22" | tail -1 || { echo "no PeerRejected in B's log"; return 1; }
    api c metrics | grep -E "^wgmesh_tsmp_rejects_sent.* [1-9]" || return 1
}
check "policy forbids B->C port 22 (TSMP reject in B's diagnostics), allows the rest" policy_blocks_b_to_c_ssh

# PostgreSQL: two replicas of the server on one database.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
replicas_on_postgres() {
    PG_DIR=$(mktemp -d /tmp/wgmesh-e2e-pg.XXXXXX)
    chown postgres "$PG_DIR" || return 1
    su postgres -c "$PG_BIN/initdb -D '$PG_DIR/data' -A trust -U postgres" >"$TMP/pg-init.log" 2>&1 || { cat "$TMP/pg-init.log"; return 1; }
    # The replicas connect from the bridge network, with no password (a
    # throwaway cluster in a namespace of its own).
    echo "host all all 10.78.0.0/24 trust" >>"$PG_DIR/data/pg_hba.conf" || return 1
    # The cluster listens inside the server's namespace, on its bridge address.
    in_ns "$NS_S" su postgres -c "$PG_BIN/pg_ctl -D '$PG_DIR/data' -l '$PG_DIR/log' -w -t 30 \
        -o \"-c listen_addresses=10.78.0.10 -c port=5433 -c unix_socket_directories='$PG_DIR'\" start" >/dev/null || { cat "$PG_DIR/log"; return 1; }
    in_ns "$NS_S" su postgres -c "$PG_BIN/createdb -h 10.78.0.10 -p 5433 wgmesh" || return 1
    # The SQLite server gives way to two replicas on PostgreSQL.
    kill -TERM "${PID[server]}"; wait "${PID[server]}" 2>/dev/null || true
    local db="postgres://postgres@10.78.0.10:5433/wgmesh"
    start_server r1 "$db" 10.78.0.10:8081 "$TMP/admin1.sock" || return 1
    start_server r2 "$db" 10.78.0.10:8082 "$TMP/admin2.sock" || return 1
    local n auth
    for n in a b c; do
        kill -TERM "${PID[$n]}"; wait "${PID[$n]}" 2>/dev/null || true
        rm -rf "$TMP/node-$n"
        auth=$("$CONTROL" --admin-socket "$TMP/admin1.sock" authkey create --tag "tag:$n") || return 1
        write_node_config "$n" "$auth" http://10.78.0.10:8081 http://10.78.0.10:8082
    done
    # C registers through the second replica: the first must learn of it.
    sed -i 's#url = \["http://10.78.0.10:8081", "http://10.78.0.10:8082"\]#url = ["http://10.78.0.10:8082", "http://10.78.0.10:8081"]#' "$TMP/c.toml"
    start_node a && start_node b && start_node c || return 1
    wait_connected a 2 && wait_connected b 2 && wait_connected c 2 || return 1
    ADDR_A=$(addr_of a); ADDR_B=$(addr_of b); ADDR_C=$(addr_of c)
    ping_until "$NS_A" "$ADDR_C" 25 || { echo "A->C across replicas"; return 1; }
    ping_until "$NS_C" "$ADDR_B" 25 || { echo "C->B across replicas"; return 1; }
    # Replica 1 dies; traffic goes on and A and B move to replica 2.
    ip netns exec "$NS_A" ping -c 30 -i 0.1 -W 1 "$ADDR_B" >"$TMP/ping-failover" 2>&1 &
    local ping=$!
    kill -KILL "${PID[r1]}"; wait "${PID[r1]}" 2>/dev/null || true
    wait "$ping" || true
    grep -qE " 0% packet loss" "$TMP/ping-failover" || { tail -3 "$TMP/ping-failover"; return 1; }
    for n in a b; do
        for _ in $(seq 200); do
            api "$n" status --json | grep -q '"url": *"http://10.78.0.10:8082"' && api "$n" status --json | grep -q '"connected": *true' && break
            sleep 0.1
        done
        api "$n" status | grep -E "control http://10.78.0.10:8082 +connected" || { api "$n" status | head -3; return 1; }
    done
    # A restart of C now is pushed to A by replica 2 alone.
    kill -KILL "${PID[c]}"; wait "${PID[c]}" 2>/dev/null || true
    start_node c || return 1
    ping_until "$NS_A" "$ADDR_C" 50 || { echo "A->C after C restarted behind replica 2"; return 1; }
}
if [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] && id postgres >/dev/null 2>&1; then
    check "two replicas on PostgreSQL: nodes span both, one killed, nodes fail over" replicas_on_postgres
else
    skip "two replicas on PostgreSQL" "Debian's postgresql is not installed (.ci/run installs it)"
fi

echo "e2e-control: $PASSED passed, $FAILED failed, $SKIPPED skipped"
echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" = 0 ]
