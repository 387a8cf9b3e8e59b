# The recipes a person types. `just --list` shows them all.

# Run the whole test suite (what CI runs).
test:
    cargo test --workspace --all-targets --locked

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Everything CI does: lint, then test.
ci: lint test

# All benchmarks that need no root.
bench: bench-core bench-lazy bench-control

# Per-packet engine cost vs bare boringtun, reconfig cost, memory per peer.
bench-core:
    cargo bench -p wgmesh-core --bench engine --locked

# Memory per idle (trimmed) peer and the cost of waking one.
bench-lazy:
    cargo bench -p wgmesh-core --bench lazy --locked

# The coordination server (control/): time and memory for the first netmaps
# of a 10,000-node tailnet, bytes and time per node restart (delta fan-out).
# NODES scales it down on a busy machine.
bench-control NODES="10000":
    cargo bench -p wgmesh-control --bench control --locked -- --nodes {{NODES}}

# The coordination server's replica tests on a throwaway PostgreSQL cluster
# (root; 127.0.0.1:54329; deleted afterwards).
test-postgres:
    bash control-server/tests/pg.sh

# Loopback load test of one wgmesh-control server: N streaming nodes, pushes
# per second, CPU and bytes per node restart. Bounded in nodes and time.
bench-control-server NODES="200" SECONDS="10":
    cargo bench -p wgmesh-control-server --bench load --locked -- --nodes {{NODES}} --seconds {{SECONDS}}

# End-to-end tests of wgmeshd in network namespaces (root, iproute2). Builds
# release binaries; the script deletes every namespace it creates.
e2e:
    cargo build --release --locked -p wgmesh-adapters -p wgmesh-control-server --bins
    command -v boringtun-cli >/dev/null || [ -x "$HOME/.cache/wgmesh-bench/boringtun/bin/boringtun-cli" ] || timeout 600 cargo install boringtun-cli --locked --root "$HOME/.cache/wgmesh-bench/boringtun" >/dev/null 2>&1 || echo "boringtun-cli could not be installed; its interop test is skipped"
    bash adapters/tests/e2e-suites.sh target/release

# Validate a wgmeshd config file (prints file:line:column: field: problem).
check-config FILE:
    cargo run --quiet --locked -p wgmesh-adapters --bin wgmeshd -- --check --config {{FILE}}

# The simulator's tour: a few nodes idle, trimmed, woken, restarted and pinged.
tour:
    cargo run --release --locked -p wgmesh-sim -- run sim/scenarios/tour.toml

# Virtual seconds per wall second of the simulator (last line: the event
# backend on the 50-node churn hour).
sim-speed:
    cargo run --release --locked -p wgmesh-sim -- speed

# Random scenarios with invariant checks; failures are shrunk into corpus/.
explore CASES="200" SEED="1":
    cargo run --release --locked -p wgmesh-sim -- explore --cases {{CASES}} --seed {{SEED}}

# wgmeshd (batched and plain), boringtun-cli, wireguard-go and the bare veth
# in two network namespaces, iperf3 TCP, 3 interleaved runs each; installs
# what it lacks; knobs in bench/throughput/run.sh. Also the current upstream
# wireguard-go (../shared/bench-tools/wireguard-go when present) and a 4-flow
# (-P 4) run of wgmesh and of it. Last line: wgmesh's median, its ratios to
# boringtun-cli and the current wireguard-go, and the same with 4 flows.
# Userspace WireGuard throughput side by side (root).
bench-throughput:
    cargo build --release --locked -p wgmesh-adapters --bins
    bash bench/throughput/run.sh target/release/wgmeshd

# Fuzz one target for SECS seconds with cargo-fuzz/libFuzzer (targets:
# ip_parsers tsmp disco_open config scenario engine). Needs `cargo install
# cargo-fuzz`; RUSTC_BOOTSTRAP lets the stable toolchain take its nightly
# flags. New inputs go to target/fuzz-corpus/TARGET; fuzz/corpus/TARGET is
# the committed seed corpus (copy a finding there with its regression test).
fuzz TARGET SECS="60":
    mkdir -p target/fuzz-corpus/{{TARGET}}
    cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O --debug-assertions {{ if TARGET == "scenario" { "--features sim" } else { "" } }} {{TARGET}} ../target/fuzz-corpus/{{TARGET}} corpus/{{TARGET}} -- -max_total_time={{SECS}} -timeout=20 -rss_limit_mb=4096

# A three-node tailnet in network namespaces on this machine (root): prints
# each node's status, pings across, then tears it all down.
demo:
    cargo build --release --locked -p wgmesh-adapters --bins
    bash adapters/examples/demo.sh target/release

# The long soak: 200 nodes under churn (restarts, partitions, link changes,
# 30% loss) for 24 virtual hours on the event backend, in release; prints
# wall time, peak heap per node and the churn and traffic figures.
soak:
    cargo test --release --locked -p wgmesh-sim --test soak -- --ignored --nocapture --exact soak_200_nodes_24_virtual_hours

# The committed files too slow on the turmoil backend for every `cargo test`
# (see SLOW_ON_TURMOIL in sim/tests/common/mod.rs), run there too: every
# file on every backend it lists, and both backends compared at seeds 1-5
# (about 2.5 hours on 2 cores: the fifty-node hour takes 24 minutes per
# turmoil run; WGMESH_SIM_BACKEND_SEEDS=1 compares seed 1 only).
sim-slow:
    WGMESH_SIM_SLOW=1 cargo test --release --locked -p wgmesh-sim --test scenarios --test backends -- --nocapture
