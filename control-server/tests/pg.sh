#!/usr/bin/env bash
# Runs the PostgreSQL replica tests (control-server/tests/pg.rs) against a
# throwaway PostgreSQL cluster: as root, it makes a cluster in a temporary
# directory owned by the postgres user, starts it on 127.0.0.1:54329 (trust
# auth on loopback only), runs the tests with WGMESH_TEST_POSTGRES pointing
# at it, then stops it and deletes the directory, whatever happened.
#
# Needs Debian's `postgresql` package (.ci/run installs it). Without root or
# without PostgreSQL it says why and exits 0 (nothing was checked).
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT=54329
if [ "$(id -u)" != 0 ]; then
    echo "pg.sh: needs root (runs PostgreSQL as user postgres); skipped"
    exit 0
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ] || ! id postgres >/dev/null 2>&1; then
    echo "pg.sh: PostgreSQL is not installed (apt-get install --no-install-recommends postgresql); skipped"
    exit 0
fi

DATA=$(mktemp -d /tmp/wgmesh-pg.XXXXXX)
chown postgres: "$DATA"
cleanup() {
    runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA/db" -m immediate -w -t 20 stop >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap cleanup EXIT

runuser -u postgres -- "$BIN/initdb" -D "$DATA/db" -U postgres --auth=trust -E UTF8 >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA/db" -l "$DATA/log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c fsync=off" start >/dev/null

export WGMESH_TEST_POSTGRES="postgres://postgres@127.0.0.1:$PORT/postgres"
# `--workspace` rather than `-p wgmesh-control-server`: the features of the
# dependencies then unify exactly as in `just test`, so this reuses that
# build instead of compiling a second copy of tokio, clap and the rest
# (2 min 44 s on the 2-core development machine, measured once).
timeout 600 cargo test --locked --workspace --test pg -- --test-threads=1 --nocapture
