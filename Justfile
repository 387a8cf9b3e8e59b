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
bench: bench-core bench-lazy

# Per-packet engine cost vs bare boringtun, reconfig cost, memory per peer.
bench-core:
    cargo bench -p wgmesh-core --bench engine --locked

# Memory per idle (trimmed) peer and the cost of waking one.
bench-lazy:
    cargo bench -p wgmesh-core --bench lazy --locked
