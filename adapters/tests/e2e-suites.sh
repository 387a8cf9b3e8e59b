#!/usr/bin/env bash
# Runs every end-to-end suite one after another: `e2e.sh` (the daemon, its
# CLI, interop and the batched data plane), then each `e2e-*.sh` beside it
# (one feature area each, with namespaces of its own). Suites run in
# sequence, never at once, because each one owns its namespaces and
# processes only while it runs. Exits non-zero if any suite failed, after
# running them all, so one failure does not hide another.
# Usage: adapters/tests/e2e-suites.sh [BIN_DIR]
set -uo pipefail

BIN=${1:-target/release}
HERE=$(dirname "$0")
failed=()
for suite in "$HERE/e2e.sh" "$HERE"/e2e-[a-z]*.sh; do
    [ -e "$suite" ] || continue
    case "$(basename "$suite")" in
        e2e-suites.sh) continue ;;
    esac
    echo "== suite $(basename "$suite")"
    if ! bash "$suite" "$BIN"; then
        failed+=("$(basename "$suite")")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "e2e suites failed: ${failed[*]}"
    exit 1
fi
echo "e2e suites: all passed"
