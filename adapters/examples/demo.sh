#!/usr/bin/env bash
# A three-node tailnet on this machine: three network namespaces on one
# bridge, a wgmeshd in each, full mesh. Prints each node's `wgmesh status`,
# pings across with the kernel and with `wgmesh ping`, then tears everything
# down (also on Ctrl-C or failure). Needs root and iproute2.
# Usage: adapters/examples/demo.sh [BIN_DIR]   (default target/release)
set -euo pipefail

BIN=${1:-target/release}
WGMESHD=$(realpath "$BIN/wgmeshd")
WGMESH=$(realpath "$BIN/wgmesh")
TMP=$(mktemp -d /tmp/wgmesh-demo.XXXXXX)
NODES=(a b c)
PIDS=()

if [ "$(id -u)" != 0 ]; then
    echo "demo: run as root (it creates network namespaces)" >&2
    exit 1
fi

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for n in "${NODES[@]}" br; do ip netns del "wgm-demo-$n" 2>/dev/null || true; done
    rm -f /var/run/wireguard/demo-*.sock
    rm -rf "$TMP"
}
trap cleanup EXIT
trap "exit 130" INT TERM

ip netns add wgm-demo-br
ip -n wgm-demo-br link add br0 type bridge
ip -n wgm-demo-br link set br0 up
declare -A KEY PUB DISCO DPUB
i=1
for n in "${NODES[@]}"; do
    ns=wgm-demo-$n
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "veth-$n" netns "$ns" type veth peer name "br-$n" netns wgm-demo-br
    ip -n wgm-demo-br link set "br-$n" master br0 up
    ip -n "$ns" addr add "10.88.0.$i/24" dev "veth-$n"
    ip -n "$ns" link set "veth-$n" up
    KEY[$n]=$("$WGMESH" genkey); PUB[$n]=$(echo "${KEY[$n]}" | "$WGMESH" pubkey)
    DISCO[$n]=$("$WGMESH" genkey); DPUB[$n]=$(echo "${DISCO[$n]}" | "$WGMESH" pubkey)
    i=$((i + 1))
done

ip_of() { case $1 in a) echo 1 ;; b) echo 2 ;; c) echo 3 ;; esac; }

for n in "${NODES[@]}"; do
    {
        echo "[interface]"
        echo "name = \"demo-$n\""
        echo "private_key = \"${KEY[$n]}\""
        echo "disco_private_key = \"${DISCO[$n]}\""
        echo "listen_port = 41641"
        echo "addresses = [\"100.64.0.$(ip_of "$n")/32\"]"
        echo
        echo "[dns]"
        echo "mode = \"off\""
        for p in "${NODES[@]}"; do
            [ "$p" = "$n" ] && continue
            echo
            echo "[[peer]]"
            echo "name = \"node-$p\""
            echo "public_key = \"${PUB[$p]}\""
            echo "disco_key = \"${DPUB[$p]}\""
            echo "endpoints = [\"10.88.0.$(ip_of "$p"):41641\"]"
            echo "allowed_ips = [\"100.64.0.$(ip_of "$p")/32\"]"
        done
    } >"$TMP/$n.toml"
    ip netns exec "wgm-demo-$n" "$WGMESHD" --foreground --config "$TMP/$n.toml" \
        --state-dir "$TMP/state-$n" >"$TMP/$n.log" 2>&1 &
    PIDS+=($!)
done
for n in "${NODES[@]}"; do
    for _ in $(seq 100); do [ -S "$TMP/state-$n/demo-$n.sock" ] && break; sleep 0.1; done
done

echo "== kernel ping across the tunnel"
for n in "${NODES[@]}"; do
    for p in "${NODES[@]}"; do
        [ "$p" = "$n" ] && continue
        if ip netns exec "wgm-demo-$n" ping -c 1 -W 2 "100.64.0.$(ip_of "$p")" >/dev/null; then
            echo "node-$n -> node-$p: ok"
        else
            echo "node-$n -> node-$p: no answer"
        fi
    done
done

echo
echo "== wgmesh ping (disco, TSMP, ICMP) from node-a to node-c"
for kind in disco tsmp icmp; do
    ip netns exec wgm-demo-a "$WGMESH" --socket "$TMP/state-a/demo-a.sock" ping "--$kind" -c 3 100.64.0.3 || true
done

for n in "${NODES[@]}"; do
    echo
    echo "== wgmesh status on node-$n"
    ip netns exec "wgm-demo-$n" "$WGMESH" --socket "$TMP/state-$n/demo-$n.sock" status
done
echo
echo "== tearing down"
