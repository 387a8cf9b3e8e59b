#!/usr/bin/env bash
# Prints the trace hash of every committed scenario and corpus file, on each
# backend the file declares, for seeds 1-5: one line per run, in a fixed order,
# so two invocations (before and after a change) can be compared with diff.
# Usage: sim/tools/trace-hashes.sh [path/to/wgmesh-sim]
set -euo pipefail
cd "$(dirname "$0")/../.."
sim="${1:-target/release/wgmesh-sim}"
for file in sim/scenarios/*.toml corpus/*.toml; do
    backends=$(sed -n 's/^backends *= *\[\(.*\)\]/\1/p' "$file" | tr -d '" ' | tr ',' ' ')
    [ -n "$backends" ] || backends="event"
    for backend in $backends; do
        for seed in 1 2 3 4 5; do
            hash=$("$sim" run "$file" --seed "$seed" --backend "$backend" --json 2>/dev/null |
                sed -n 's/.*"trace_hash": *"\([0-9a-f]*\)".*/\1/p' | tail -1 || true)
            printf '%-60s %-8s seed %s  %s\n' "$file" "$backend" "$seed" "${hash:-ERROR}"
        done
    done
done
