#!/usr/bin/env bash
# Throughput rig (issue 7): userspace WireGuard implementations side by side.
#
# Two network namespaces joined by a veth pair; in each, one userspace
# WireGuard daemon configured with `wg` through its UAPI socket; iperf3 TCP
# over the tunnel for $BENCH_SECONDS s, $BENCH_RUNS runs per implementation,
# interleaved (run 1 of every implementation, then run 2, ...):
#
#   wgmesh        wgmeshd <-> wgmeshd, batched data plane (WGMESH_FASTPATH=1)
#   wgmesh-plain  wgmeshd <-> wgmeshd, one packet per system call (the default)
#   boringtun     boringtun-cli <-> boringtun-cli, 1 thread
#   wg-go-debian  Debian's wireguard-go <-> itself
#   wg-go-current the reference build of upstream wireguard-go (TUN offloads,
#                 UDP GSO/GRO), /work/shared/bench-tools/wireguard-go or
#                 ../shared/bench-tools/wireguard-go next to the repository,
#                 when present
#   wg-go:<name>  any other wireguard-go on PATH or in $BENCH_WG_GO (":"-separated
#                 absolute or relative paths; <name> is the file's base name)
#   veth          the bare veth pair, no tunnel
#   <impl>-P4     the same daemons with 4 parallel iperf3 flows (-P 4), for
#                 every implementation in $BENCH_P4 (default "wgmesh
#                 wg-go-current"): the loaded RTT of a sparse ping next to
#                 bulk flows
#
# Per implementation: median Gbit/s, retransmits, the daemons' CPU share
# (utime+stime from /proc/<pid>/stat over the transfer, % of one core, side A
# = sender / side B = receiver), ratio to boringtun-cli, and ping RTT over the
# tunnel idle and during the transfer, and each daemon's CPU per Gbit/s
# (cores per Gbit/s received). Last line:
#   wgmesh median X Gbit/s, Y x boringtun-cli, Z x wg-go-current; -P 4: ...
#
# Needs root. Installs what it lacks with apt-get --no-install-recommends and
# boringtun-cli with cargo into $BENCH_CACHE. Deletes both namespaces and
# kills every process it started on exit, also on INT/TERM. Every wait is
# bounded; traffic stays inside the namespaces.
#
# Usage: bench/throughput/run.sh [WGMESHD_BINARY]
# Environment: BENCH_RUNS (3), BENCH_SECONDS (5), BENCH_ONLY (space-separated
# implementation names to keep, e.g. "wgmesh boringtun"), BENCH_PIN=1 (pin
# side A to CPU 0 and side B to CPU 1), BENCH_WG_GO (extra wireguard-go
# binaries), BENCH_CACHE (default ~/.cache/wgmesh-bench), WGMESHD_ENV
# (environment of the "wgmesh" daemons, default "WGMESH_FASTPATH=1"),
# BENCH_WGMESH_VARIANTS (more wgmeshd runs as "name=ENV;name=ENV", e.g.
# "no-gso=WGMESH_FASTPATH=1 WGMESH_FASTPATH_GSO=0"; WGMESHD=PATH in a
# variant's environment runs another wgmeshd binary), BENCH_KEEP_LOGS=1 (keep
# the logs, iperf3 JSON and pings in the temporary directory), BENCH_PERF=1
# (with BENCH_KEEP_LOGS=1: `perf record -g` of each daemon during the transfer),
# BENCH_IPERF_ARGS (more iperf3 client options, e.g. "-C cubic" or "-P 2"),
# BENCH_P4 (implementations measured again with -P 4, "" for none),
# BENCH_TRACE=1 (tcpdump the loaded pings on both TUN devices and print where
# they spend their time: sender to receiver, the receiver's turnaround, and
# back, each way split into the sending daemon, the veth and the receiving
# daemon; installs tcpdump), BENCH_IPERF_NICE=N (run iperf3 at nice N, e.g.
# -10 to keep it ahead of other work on the machine while the daemons'
# default -20 stays above it), BENCH_PAIRS (space-separated "a/b" pairs of
# implementations, e.g. "wgmesh-P4/wgmesh-nofq-P4": each round's Gbit/s of a
# over b's in the same round, printed as the median and range of those
# ratios; every wgmesh row is also paired with the current wireguard-go),
# BENCH_PERF_STAT (perf stat events counted in each daemon during the
# transfer, e.g. "context-switches,raw_syscalls:sys_enter", printed per
# gigabyte received for each round).
set -euo pipefail

WGMESHD=${1:-target/release/wgmeshd}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WGMESHD_ENV=${WGMESHD_ENV-WGMESH_FASTPATH=1}
RUNS=${BENCH_RUNS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
CACHE=${BENCH_CACHE:-${HOME:-/root}/.cache/wgmesh-bench}
NS_A=wgbench-a
NS_B=wgbench-b
IF_A=wgbnA
IF_B=wgbnB
UNDER_A=10.99.0.1
UNDER_B=10.99.0.2
TUN_A=10.100.0.1
TUN_B=10.100.0.2
TUN_MTU=1420
PORT=51820
TMP=$(mktemp -d /tmp/wgmesh-bench.XXXXXX)
PIDS=()

die() { echo "bench: $*" >&2; exit 1; }
note() { echo "# $*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, TUN devices)"
[ "$RUNS" -ge 1 ] && [ "$RUNS" -le 20 ] || die "BENCH_RUNS must be 1..20"
[ "$SECONDS_PER_RUN" -ge 1 ] && [ "$SECONDS_PER_RUN" -le 60 ] || die "BENCH_SECONDS must be 1..60"

kill_pid() { # pid: TERM, wait up to 3 s, KILL
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill_pid "$pid"; done
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    rm -f "/var/run/wireguard/$IF_A.sock" "/var/run/wireguard/$IF_B.sock"
    if [ "${BENCH_KEEP_LOGS:-0}" = 1 ]; then note "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools ------------------------------------------------------------------
need_pkgs=()
command -v iperf3 >/dev/null || need_pkgs+=(iperf3)
command -v wg >/dev/null || need_pkgs+=(wireguard-tools)
[ -x /usr/bin/wireguard-go ] || need_pkgs+=(wireguard-go)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v ping >/dev/null || need_pkgs+=(iputils-ping)
command -v python3 >/dev/null || need_pkgs+=(python3)
if [ "${BENCH_TRACE:-0}" = 1 ]; then command -v tcpdump >/dev/null || need_pkgs+=(tcpdump); fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    note "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null || true
    timeout 600 apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null \
        || die "apt-get install ${need_pkgs[*]} failed"
fi

BORINGTUN=$(command -v boringtun-cli || true)
if [ -z "$BORINGTUN" ] && [ -x "$CACHE/boringtun/bin/boringtun-cli" ]; then
    BORINGTUN=$CACHE/boringtun/bin/boringtun-cli
fi
wanted() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }
if [ -z "$BORINGTUN" ] && wanted boringtun && command -v cargo >/dev/null; then
    note "installing boringtun-cli into $CACHE/boringtun (once)"
    mkdir -p "$CACHE"
    if timeout 1200 cargo install boringtun-cli --locked --root "$CACHE/boringtun" >"$TMP/bt-install.log" 2>&1; then
        BORINGTUN=$CACHE/boringtun/bin/boringtun-cli
    else
        note "cargo install boringtun-cli failed; skipping it"; tail -5 "$TMP/bt-install.log" >&2
    fi
fi

[ -x "$WGMESHD" ] || die "no wgmeshd at $WGMESHD (cargo build --release -p wgmesh-adapters)"
WGMESHD=$(realpath "$WGMESHD")

# Implementations, in the order they run within a round.
IMPLS=(wgmesh wgmesh-plain)
declare -A WGMESH_ENV=([wgmesh]=$WGMESHD_ENV [wgmesh-plain]="WGMESH_FASTPATH=0")
IFS=';' read -r -a variants <<<"${BENCH_WGMESH_VARIANTS:-}"
for variant in "${variants[@]}"; do
    [ -n "$variant" ] || continue
    IMPLS+=("wgmesh-${variant%%=*}"); WGMESH_ENV["wgmesh-${variant%%=*}"]=${variant#*=}
done
[ -n "$BORINGTUN" ] && IMPLS+=(boringtun)
declare -A WG_GO_BIN
DEBIAN_WG_GO=$(realpath /usr/bin/wireguard-go 2>/dev/null || true)
if [ -n "$DEBIAN_WG_GO" ]; then IMPLS+=(wg-go-debian); WG_GO_BIN[wg-go-debian]=$DEBIAN_WG_GO; fi
declare -A seen=([$DEBIAN_WG_GO]=1)
# The reference build of the current upstream wireguard-go (see
# /work/shared/bench-tools/README.md), next to the repository or at its
# usual place on the development machine.
for candidate in "$REPO/../shared/bench-tools/wireguard-go" /work/shared/bench-tools/wireguard-go; do
    [ -x "$candidate" ] || continue
    real=$(realpath "$candidate")
    [ -z "${seen[$real]:-}" ] || continue
    seen[$real]=1
    IMPLS+=(wg-go-current); WG_GO_BIN[wg-go-current]=$real
    break
done
IFS=: read -r -a extra_go <<<"${BENCH_WG_GO:-}"
while IFS= read -r candidate; do extra_go+=("$candidate"); done < <(which -a wireguard-go 2>/dev/null || true)
for candidate in "${extra_go[@]}"; do
    [ -n "$candidate" ] || continue
    [ -x "$candidate" ] || { note "BENCH_WG_GO: $candidate is not an executable; skipped"; continue; }
    real=$(realpath "$candidate")
    [ -z "${seen[$real]:-}" ] || continue
    seen[$real]=1
    # Named by the file's base name (a path would not fit the table); a
    # second binary of the same base name gets a number.
    name="wg-go:$(basename "$candidate")"
    n=2; base=$name
    while [ -n "${WG_GO_BIN[$name]:-}" ]; do name="$base#$n"; n=$((n + 1)); done
    IMPLS+=("$name"); WG_GO_BIN[$name]=$real
done
# Every implementation in BENCH_P4 is measured a second time with 4 flows.
declare -A BASE_OF FLOWS
for impl in "${IMPLS[@]}"; do
    for want in ${BENCH_P4-wgmesh wg-go-current}; do
        [ "$impl" = "$want" ] || continue
        IMPLS+=("$impl-P4"); BASE_OF["$impl-P4"]=$impl; FLOWS["$impl-P4"]=4
    done
done
# A file name for an implementation's logs and results.
file_tag() { local t=${1//[:\/#]/_}; echo "$t"; }
IMPLS+=(veth)
if [ -n "${BENCH_ONLY:-}" ]; then
    kept=()
    # An implementation named in BENCH_ONLY keeps its 4-flow row too (when
    # BENCH_P4 asks for one), so a short run still prints the -P 4 figures.
    for impl in "${IMPLS[@]}"; do
        for want in $BENCH_ONLY; do
            if [ "$impl" = "$want" ] || [ "${BASE_OF[$impl]:-}" = "$want" ]; then
                kept+=("$impl")
                break
            fi
        done
    done
    IMPLS=("${kept[@]}")
fi
[ "${#IMPLS[@]}" -gt 0 ] || die "nothing to measure"

# --- the network --------------------------------------------------------------
ip netns del "$NS_A" 2>/dev/null || true
ip netns del "$NS_B" 2>/dev/null || true
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add veth-bench-a netns "$NS_A" type veth peer name veth-bench-b netns "$NS_B"
ip -n "$NS_A" addr add "$UNDER_A/24" dev veth-bench-a
ip -n "$NS_B" addr add "$UNDER_B/24" dev veth-bench-b
for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
done
ip -n "$NS_A" link set veth-bench-a up
ip -n "$NS_B" link set veth-bench-b up

(umask 077; wg genkey >"$TMP/key-a"); wg pubkey <"$TMP/key-a" >"$TMP/pub-a"
(umask 077; wg genkey >"$TMP/key-b"); wg pubkey <"$TMP/key-b" >"$TMP/pub-b"

CPU_A=""; CPU_B=""
if [ "${BENCH_PIN:-0}" = 1 ]; then CPU_A="taskset -c 0"; CPU_B="taskset -c 1"; fi

in_ns() { ip netns exec "$@"; }

# start_daemon impl side(a|b): starts one daemon, leaves its pid in LAST_PID.
# (Not in a $(...) subshell: the pid must land in PIDS of this shell.)
start_daemon() {
    local impl=${BASE_OF[$1]:-$1} side=$2 ns iface pin log
    if [ "$side" = a ]; then ns=$NS_A; iface=$IF_A; pin=$CPU_A; else ns=$NS_B; iface=$IF_B; pin=$CPU_B; fi
    log="$TMP/$(file_tag "$1")-$side.log"
    rm -f "/var/run/wireguard/$iface.sock"
    case $impl in
        wgmesh*)
            mkdir -p "$TMP/state-$side"
            # A variant may name another binary (WGMESHD=PATH in its
            # environment): before/after comparisons in one run.
            local bin=$WGMESHD kv
            for kv in ${WGMESH_ENV[$impl]}; do
                case $kv in WGMESHD=*) bin=$(realpath "${kv#WGMESHD=}") ;; esac
            done
            # shellcheck disable=SC2086
            ip netns exec "$ns" env RUST_LOG=warn ${WGMESH_ENV[$impl]} $pin "$bin" --foreground \
                --interface "$iface" --state-dir "$TMP/state-$side" \
                --resolv-conf "$TMP/resolv-$side" >"$log" 2>&1 &
            ;;
        boringtun)
            # shellcheck disable=SC2086
            ip netns exec "$ns" env WG_SUDO=1 $pin "$BORINGTUN" --foreground --threads 1 \
                --disable-drop-privileges "$iface" >"$log" 2>&1 &
            ;;
        wg-go*)
            # shellcheck disable=SC2086
            ip netns exec "$ns" env LOG_LEVEL=error $pin "${WG_GO_BIN[$impl]}" -f "$iface" >"$log" 2>&1 &
            ;;
    esac
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_socket() { # iface pid
    for _ in $(seq 100); do
        [ -S "/var/run/wireguard/$1.sock" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

configure_side() { # ns iface key peer_pub peer_under my_tun peer_tun
    local ns=$1 iface=$2
    in_ns "$ns" wg set "$iface" private-key "$3" listen-port "$PORT" \
        peer "$(cat "$4")" endpoint "$5:$PORT" allowed-ips "$7/32"
    in_ns "$ns" ip addr add "$6/32" dev "$iface"
    in_ns "$ns" ip link set "$iface" mtu "$TUN_MTU" up
    in_ns "$ns" ip route add "$7/32" dev "$iface"
}

# setup impl: leaves DAEMON_A / DAEMON_B and TARGET set; returns non-zero on failure.
setup() {
    local impl=$1
    DAEMON_A=""; DAEMON_B=""
    if [ "$impl" = veth ]; then TARGET=$UNDER_B; return 0; fi
    TARGET=$TUN_B
    start_daemon "$impl" a; DAEMON_A=$LAST_PID
    start_daemon "$impl" b; DAEMON_B=$LAST_PID
    wait_socket "$IF_A" "$DAEMON_A" || { note "$impl: side A did not start"; return 1; }
    wait_socket "$IF_B" "$DAEMON_B" || { note "$impl: side B did not start"; return 1; }
    configure_side "$NS_A" "$IF_A" "$TMP/key-a" "$TMP/pub-b" "$UNDER_B" "$TUN_A" "$TUN_B" || return 1
    configure_side "$NS_B" "$IF_B" "$TMP/key-b" "$TMP/pub-a" "$UNDER_A" "$TUN_B" "$TUN_A" || return 1
    for _ in $(seq 20); do
        in_ns "$NS_A" ping -c 1 -W 1 -q "$TUN_B" >/dev/null 2>&1 && return 0
    done
    note "$impl: no ping over the tunnel"
    return 1
}

teardown() {
    local pid
    for pid in $DAEMON_A $DAEMON_B; do kill_pid "$pid"; done
    rm -f "/var/run/wireguard/$IF_A.sock" "/var/run/wireguard/$IF_B.sock"
    # The TUN devices go with their processes; make sure.
    in_ns "$NS_A" ip link del "$IF_A" 2>/dev/null || true
    in_ns "$NS_B" ip link del "$IF_B" 2>/dev/null || true
}

cpu_ticks() { # pid -> utime+stime in clock ticks (0 if none)
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
    # Fields after the ")" of comm: state is 3rd, utime 14th, stime 15th.
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

now_ns() { date +%s%N; }

ping_median() { # file -> median RTT in ms of "time=" lines, or "-"
    grep -o 'time=[0-9.]*' "$1" 2>/dev/null | cut -d= -f2 | sort -g \
        | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'
}

# trace_report impl round prefix: where the loaded pings spent their time.
# The pings are timed where they enter and leave each TUN, and (their
# encrypted datagrams: an 84-byte ping is a 116-byte WireGuard message, alone
# or at the end of a GSO run of 1452-byte ones) where they leave one
# veth end and arrive at the other, so each leg splits into the sending
# daemon (TUN ring, fair queue, encryption, UDP send), the veth, and the
# receiving daemon (its UDP socket's queue, decryption, TUN write).
trace_report() {
    python3 - "$1" "$2" "$3" <<'PY' >&2 || true
import bisect, os, re, statistics, subprocess, sys
impl, rnd, pre = sys.argv[1:4]
def lines(name):
    path = "%s.trace-%s.pcap" % (pre, name)
    if not os.path.exists(path):
        return []
    return subprocess.run(["tcpdump", "-n", "-tt", "--time-stamp-precision=nano", "-r", path],
                          capture_output=True, text=True).stdout.splitlines()
def stamps(side):
    seen = {}
    for line in lines(side):
        m = re.match(r"(\S+) .*echo (request|reply), id \d+, seq (\d+)", line)
        if m:
            seen.setdefault((m.group(2), int(m.group(3))), float(m.group(1)))
    return seen
def wire(side):
    # Ping datagrams seen on a veth end: (time, source address) in order.
    out = []
    for line in lines(side):
        m = re.match(r"(\S+) IP (\S+)\.\d+ > ", line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out
a, b = stamps("A"), stamps("B")
va, vb = wire("vA"), wire("vB")
def first_after(seq, t, src):
    # The first ping datagram from src at or after t.
    i = bisect.bisect_left(seq, (t, ""))
    while i < len(seq):
        if seq[i][1] == src:
            return seq[i][0]
        i += 1
    return None
legs = {k: [] for k in ("forward", "turnaround", "reverse", "a_send", "a_wire", "b_recv",
                        "b_send", "b_wire", "a_recv")}
for (kind, seq), t0 in a.items():
    if kind != "request" or ("request", seq) not in b or ("reply", seq) not in b or ("reply", seq) not in a:
        continue
    t1, t2, t3 = b[("request", seq)], b[("reply", seq)], a[("reply", seq)]
    legs["forward"].append(t1 - t0)
    legs["turnaround"].append(t2 - t1)
    legs["reverse"].append(t3 - t2)
    wa, wb = first_after(va, t0, "10.99.0.1"), first_after(vb, t0, "10.99.0.1")
    if wa is not None and wb is not None and t0 <= wa <= wb <= t1:
        legs["a_send"].append(wa - t0); legs["a_wire"].append(wb - wa); legs["b_recv"].append(t1 - wb)
    wb2, wa2 = first_after(vb, t2, "10.99.0.2"), first_after(va, t2, "10.99.0.2")
    if wb2 is not None and wa2 is not None and t2 <= wb2 <= wa2 <= t3:
        legs["b_send"].append(wb2 - t2); legs["b_wire"].append(wa2 - wb2); legs["a_recv"].append(t3 - wa2)
def ms(k):
    v = legs[k]
    return "%.3f (max %.3f)" % (1e3 * statistics.median(v), 1e3 * max(v)) if v else "-"
if legs["forward"]:
    print("# round %s %-16s loaded pings (%d): A TUN -> B TUN %s, B turnaround %s, "
          "B TUN -> A TUN %s" % (rnd, impl, len(legs["forward"]), ms("forward"),
                                 ms("turnaround"), ms("reverse")))
    if legs["a_send"] or legs["b_send"]:
        print("#   forward: A daemon %s, veth %s, B socket+daemon %s (%d matched); "
              "reverse: B daemon %s, veth %s, A socket+daemon %s (%d matched)" % (
                  ms("a_send"), ms("a_wire"), ms("b_recv"), len(legs["a_send"]),
                  ms("b_send"), ms("b_wire"), ms("a_recv"), len(legs["b_send"])))
else:
    print("# round %s %-16s no traced pings" % (rnd, impl))
PY
}

CLK_TCK=$(getconf CLK_TCK)
IPERF_NICE=""
if [ -n "${BENCH_IPERF_NICE:-}" ]; then IPERF_NICE="nice -n $BENCH_IPERF_NICE"; fi
RESULTS=$TMP/results.tsv
: >"$RESULTS"

# measure impl round: one transfer; appends a line to $RESULTS.
measure() {
    local impl=$1 round=$2 tag
    tag=$(file_tag "$1")
    local pre="$TMP/$tag-$round"
    # Idle RTT first (10 pings, 0.1 s apart).
    in_ns "$NS_A" ping -c 10 -i 0.1 -W 1 "$TARGET" >"$pre.ping-idle" 2>&1 || true
    # iperf3 server in B, one test, bounded.
    in_ns "$NS_B" timeout $((SECONDS_PER_RUN + 20)) $IPERF_NICE iperf3 -s -1 -B "$TARGET" >"$pre.server" 2>&1 &
    local server=$!
    PIDS+=("$server")
    for _ in $(seq 50); do
        in_ns "$NS_B" ss -ltn 2>/dev/null | grep -q ":5201 " && break
        sleep 0.05
    done
    local a0 b0 t0 a1 b1 t1
    a0=$(cpu_ticks "$DAEMON_A"); b0=$(cpu_ticks "$DAEMON_B"); t0=$(now_ns)
    # Loaded RTT: pings during the transfer, starting 1 s in.
    local pings=$(( (SECONDS_PER_RUN - 1) * 5 ))
    [ "$pings" -ge 3 ] || pings=3
    (sleep 1; in_ns "$NS_A" ping -c "$pings" -i 0.2 -W 1 "$TARGET" >"$pre.ping-load" 2>&1 || true) &
    local pinger=$!
    PIDS+=("$pinger")
    local perf_pids=() trace_pids=()
    if [ "${BENCH_TRACE:-0}" = 1 ] && [ -n "$DAEMON_A" ]; then
        # Timestamps of the loaded pings where they enter and leave each
        # TUN (one clock for both namespaces).
        for side in A B; do
            local tns=$NS_A tif=$IF_A; [ "$side" = B ] && { tns=$NS_B; tif=$IF_B; }
            in_ns "$tns" timeout $((SECONDS_PER_RUN + 5)) tcpdump -n -q -U -i "$tif" \
                -w "$pre.trace-$side.pcap" icmp >/dev/null 2>&1 &
            trace_pids+=($!); PIDS+=($!)
        done
        # The pings' encrypted datagrams on both veth ends (116 bytes: no padding), alone or at the end of a GSO run of full-sized ones (1452 bytes each).
        for side in vA vB; do
            local tns=$NS_A tif=veth-bench-a; [ "$side" = vB ] && { tns=$NS_B; tif=veth-bench-b; }
            in_ns "$tns" timeout $((SECONDS_PER_RUN + 5)) tcpdump -n -q -U -i "$tif" \
                -w "$pre.trace-$side.pcap" "${BENCH_TRACE_WIRE_FILTER:-udp and (udp[4:2] - 8) % 1452 = 116}" >/dev/null 2>&1 &
            trace_pids+=($!); PIDS+=($!)
        done
    fi
    if [ "${BENCH_PERF:-0}" = 1 ] && [ -n "$DAEMON_A" ] && command -v perf >/dev/null; then
        for side in A B; do
            local dpid=$DAEMON_A; [ "$side" = B ] && dpid=$DAEMON_B
            perf record -q -e cpu-clock -F 999 -g -p "$dpid" -o "$pre.perf-$side" \
                -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 &
            perf_pids+=($!); PIDS+=($!)
        done
    fi
    if [ -n "${BENCH_PERF_STAT:-}" ] && [ -n "$DAEMON_A" ] && command -v perf >/dev/null; then
        for side in A B; do
            local dpid=$DAEMON_A; [ "$side" = B ] && dpid=$DAEMON_B
            perf stat -x, -e "$BENCH_PERF_STAT" -p "$dpid" -o "$pre.stat-$side" \
                -- sleep "$SECONDS_PER_RUN" >/dev/null 2>"$pre.stat-$side.err" &
            perf_pids+=($!); PIDS+=($!)
        done
    fi
    in_ns "$NS_A" timeout $((SECONDS_PER_RUN + 15)) $IPERF_NICE iperf3 -c "$TARGET" -t "$SECONDS_PER_RUN" -J -P "${FLOWS[$impl]:-1}" ${BENCH_IPERF_ARGS:-} \
        >"$pre.json" 2>"$pre.client-err" || true
    t1=$(now_ns); a1=$(cpu_ticks "$DAEMON_A"); b1=$(cpu_ticks "$DAEMON_B")
    wait "$pinger" 2>/dev/null || true
    for p in "${perf_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    for p in "${trace_pids[@]}"; do kill_pid "$p"; done
    [ "${#trace_pids[@]}" -gt 0 ] && trace_report "$impl" "$round" "$pre"
    kill_pid "$server"
    local gbps retr
    read -r gbps retr < <(python3 - "$pre.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
    e = j["end"]
    print("%.3f %d" % (e["sum_received"]["bits_per_second"] / 1e9, e["sum_sent"].get("retransmits", 0)))
except Exception:
    print("0 -1")
PY
)
    local wall_s cpu_a cpu_b
    wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print (b - a) / 1e9}')
    if [ -n "$DAEMON_A" ]; then
        cpu_a=$(awk -v d=$((a1 - a0)) -v hz="$CLK_TCK" -v w="$wall_s" 'BEGIN {printf "%.0f", 100 * d / hz / w}')
        cpu_b=$(awk -v d=$((b1 - b0)) -v hz="$CLK_TCK" -v w="$wall_s" 'BEGIN {printf "%.0f", 100 * d / hz / w}')
    else
        cpu_a=-; cpu_b=-
    fi
    local idle load
    idle=$(ping_median "$pre.ping-idle"); load=$(ping_median "$pre.ping-load")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$impl" "$round" "$gbps" "$retr" "$cpu_a" "$cpu_b" "$idle" "$load" >>"$RESULTS"
    printf '# round %s %-16s %7s Gbit/s  retr %-6s cpu A %4s%% B %4s%%  rtt idle %s ms load %s ms\n' \
        "$round" "$impl" "$gbps" "$retr" "$cpu_a" "$cpu_b" "$idle" "$load" >&2
    if [ -n "${BENCH_PERF_STAT:-}" ]; then
        for side in A B; do
            # perf's own complaint (an unknown event, no permission) when
            # it counted nothing.
            [ -s "$pre.stat-$side" ] || cp "$pre.stat-$side.err" "$pre.stat-$side" 2>/dev/null || continue
            # perf stat's CSV: count,unit,event,...; per gigabyte received.
            awk -F, -v g="$gbps" -v s="$SECONDS_PER_RUN" -v side="$side" -v impl="$impl" -v r="$round" '
                $1 ~ /^[0-9]+$/ && g > 0 { out = out sprintf(" %s %.0f", $3, $1 / (g * s / 8)) }
                $1 !~ /^[0-9]+$/ && $0 ~ /[a-z]/ && $0 !~ /^#/ && why == "" { why = $0 }
                END {
                    if (out != "") printf "# stat round %s %-16s %s per GB:%s\n", r, impl, side, out
                    else if (g <= 0) printf "# stat round %s %-16s %s: no transfer to count against\n", r, impl, side
                    else printf "# stat round %s %-16s %s: no counts (%s)\n", r, impl, side, why
                }
            ' "$pre.stat-$side" >&2
        done
    fi
}

note "implementations: ${IMPLS[*]}; $RUNS runs x ${SECONDS_PER_RUN} s each, interleaved"
note "wgmeshd: $WGMESHD ${WGMESHD_ENV:+($WGMESHD_ENV)}; boringtun-cli: ${BORINGTUN:-none}; pinned: ${BENCH_PIN:-0}"
for round in $(seq "$RUNS"); do
    for impl in "${IMPLS[@]}"; do
        if setup "$impl"; then
            measure "$impl" "$round"
        else
            printf '%s\t%s\t0\t-1\t-\t-\t-\t-\n' "$impl" "$round" >>"$RESULTS"
            for side in a b; do
                f="$TMP/$(file_tag "$impl")-$side.log"
                [ -s "$f" ] && { note "--- $impl $side log"; tail -5 "$f" >&2; }
            done
        fi
        teardown
    done
done

# --- the summary ----------------------------------------------------------------
python3 - "$RESULTS" "$SECONDS_PER_RUN" "${IMPLS[@]}" <<'PY'
import os, statistics, sys

path, seconds, impls = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {}
rounds = {}
for line in open(path):
    impl, rnd, gbps, retr, cpu_a, cpu_b, idle, load = line.rstrip("\n").split("\t")
    rows.setdefault(impl, []).append((float(gbps), int(retr), cpu_a, cpu_b, idle, load))
    rounds.setdefault(impl, []).append((int(rnd), float(gbps)))

def med(values):
    values = [float(v) for v in values if v not in ("-", "")]
    return statistics.median(values) if values else None

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

def per_gbit(cpu, gbps):
    """Cores per Gbit/s received, from a CPU share in % of one core."""
    return float(cpu) / 100 / gbps if cpu not in ("-", "") and gbps > 0 else "-"

summary = {}
for impl in impls:
    r = rows.get(impl, [])
    ok = [x for x in r if x[1] >= 0 and x[0] > 0]
    summary[impl] = dict(
        gbps=med([x[0] for x in r]) if r else None,
        runs=" ".join("%.2f" % x[0] for x in r),
        retr=med([x[1] for x in ok]),
        cpu_a=med([x[2] for x in ok]),
        cpu_b=med([x[3] for x in ok]),
        cpu_a_per_gbit=med([per_gbit(x[2], x[0]) for x in ok]),
        cpu_b_per_gbit=med([per_gbit(x[3], x[0]) for x in ok]),
        idle=med([x[4] for x in ok]),
        load=med([x[5] for x in ok]),
    )

def reference(impl):
    """The current wireguard-go's result with as many flows as impl."""
    return summary.get("wg-go-current-P4" if impl.endswith("-P4") else "wg-go-current", {}).get("gbps")

def ratio(a, b):
    return a / b if a is not None and b else None

base = summary.get("boringtun", {}).get("gbps")
head = "%-26s %8s  %-17s %7s %6s %6s %7s %7s %7s %7s %9s %9s %6s"
print()
print(head % (
    "implementation", "Gbit/s", "runs", "retr", "cpuA%", "cpuB%", "A c/Gb", "B c/Gb",
    "x btun", "x wg-go", "rtt idle", "rtt load", "load/idle"))
for impl in impls:
    s = summary[impl]
    lr = ratio(s["load"], s["idle"])
    print(head % (
        impl, fmt(s["gbps"], ".2f"), s["runs"], fmt(s["retr"], ".0f"),
        fmt(s["cpu_a"], ".0f"), fmt(s["cpu_b"], ".0f"),
        fmt(s["cpu_a_per_gbit"], ".3f"), fmt(s["cpu_b_per_gbit"], ".3f"),
        fmt(ratio(s["gbps"], base), ".2f"), fmt(ratio(s["gbps"], reference(impl)), ".2f"),
        fmt(s["idle"], ".3f"), fmt(s["load"], ".3f"), fmt(lr, ".1f")))
print("(Gbit/s: median of the runs, received; retr: median TCP retransmits per run; cpu: the")
print(" daemon's utime+stime over the transfer, % of one core, A sends, B receives; c/Gb: cores")
print(" per Gbit/s received; x btun / x wg-go: Gbit/s over boringtun-cli's / the current")
print(" wireguard-go's with as many flows; rtt: median ping RTT in ms over the tunnel, idle and")
print(" during the transfer, one-way is about half; -P4: 4 iperf3 flows; paired: the median and\n"
      " range of the per-round ratios of two implementations' Gbit/s)")

# Paired ratios: the rounds are interleaved, so round i of two implementations
# ran minutes apart at most, under the same load from the rest of the
# machine. The median of the per-round ratios is steadier than the ratio of
# the two medians when the machine's speed drifts between rounds.
def paired(a, b):
    ra = {rnd: g for rnd, g in rounds.get(a, [])}
    rb = {rnd: g for rnd, g in rounds.get(b, [])}
    return [ra[k] / rb[k] for k in sorted(ra) if k in rb and ra[k] > 0 and rb[k] > 0]

pairs = []
for p in os.environ.get("BENCH_PAIRS", "").split():
    if "/" in p:
        pairs.append(p.split("/", 1))
    else:
        print("BENCH_PAIRS: %r is not a pair a/b, left out" % p)
for impl in impls:
    ref = "wg-go-current-P4" if impl.endswith("-P4") else "wg-go-current"
    if impl.startswith("wgmesh") and ref in rounds and [impl, ref] not in pairs:
        pairs.append([impl, ref])
for a, b in pairs:
    r = paired(a, b)
    if r:
        print("paired %s / %s: median %.3f (%.3f-%.3f over %d rounds)" % (
            a, b, statistics.median(r), min(r), max(r), len(r)))
    else:
        print("paired %s / %s: no round measured both" % (a, b))

w = summary.get("wgmesh", {})
if w.get("gbps") is not None:
    line = "wgmesh median %.2f Gbit/s, %s x boringtun-cli, %s x wg-go-current" % (
        w["gbps"], fmt(ratio(w["gbps"], base), ".2f"), fmt(ratio(w["gbps"], reference("wgmesh")), ".2f"))
    p4 = summary.get("wgmesh-P4", {})
    if p4.get("gbps") is not None:
        line += "; -P 4: %.2f Gbit/s, %s x wg-go-current, loaded RTT %s x idle" % (
            p4["gbps"], fmt(ratio(p4["gbps"], reference("wgmesh-P4")), ".2f"),
            fmt(ratio(p4["load"], p4["idle"]), ".1f"))
    print(line)
PY
