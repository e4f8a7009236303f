#!/usr/bin/env bash
# Services the test suite needs: a private PostgreSQL server on 127.0.0.1 for the shared-storage tests
# (and Debian's fortunes package for the debian-fortunes text source).
#
#   SLIMFORMER_TEST_PG_URL="$(bash scripts/ci-services.sh)"; export SLIMFORMER_TEST_PG_URL
#
# Installs Debian's postgresql (and libpq) and fortunes when missing, creates a cluster in a private
# data directory under /tmp (owned by the postgres user, listening on 127.0.0.1 only, trust auth for a
# password-less user `slimformer` from 127.0.0.1), starts it on port 5432 or the next free port, creates
# the database `slimformer_test`, and prints the SQLAlchemy URL on stdout (progress goes to stderr).
# The URL is also written to $SLIMFORMER_PG_DIR/url. Running it again reuses a server that is already up.
# Stop the server with: runuser -u postgres -- pg_ctl -D "$SLIMFORMER_PG_DIR/data" stop
set -euo pipefail

PG_DIR="${SLIMFORMER_PG_DIR:-/tmp/slimformer-pg}"
DATA="$PG_DIR/data"
DB=slimformer_test
ROLE=slimformer
log() { echo "[ci-services] $*" >&2; }

pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; fi
}

BIN=$(pg_bin)
WANT=()
if [ -z "$BIN" ] || ! command -v psql >/dev/null 2>&1; then WANT+=(postgresql libpq5); fi
# Debian's fortune files: the `debian-fortunes` text source and its tests
if [ ! -f /usr/share/games/fortunes/fortunes ]; then WANT+=(fortunes); fi
if [ ${#WANT[@]} -gt 0 ]; then
    log "installing from Debian: ${WANT[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${WANT[@]}" >&2
    BIN=$(pg_bin)
fi
[ -n "$BIN" ] || { log "postgresql binaries not found after install"; exit 1; }
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
as_pg() { runuser -u postgres -- "$@"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -f "$DATA/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

mkdir -p "$PG_DIR"
chown postgres: "$PG_DIR"
chmod 700 "$PG_DIR"
if ! running; then
    if [ ! -f "$DATA/PG_VERSION" ]; then
        log "initdb $DATA"
        rm -rf "$DATA"
        as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=reject -E UTF8 \
            --no-instructions >/dev/null
        cat > "$DATA/pg_hba.conf" <<'EOF'
# private test cluster: local socket and 127.0.0.1 only, no passwords
local   all   all                 trust
host    all   all   127.0.0.1/32  trust
EOF
    fi
    PORT=5432
    while ! port_free "$PORT"; do PORT=$((PORT + 1)); [ "$PORT" -lt 5500 ] || { log "no free port"; exit 1; }; done
    log "starting postgres on 127.0.0.1:$PORT"
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PG_DIR -c max_connections=200 -c fsync=off" >&2 \
        || { tail -n 20 "$PG_DIR/server.log" >&2; exit 1; }
fi
PORT=$(sed -n 4p "$DATA/postmaster.pid")
psql_pg() { as_pg "$BIN/psql" -h "$PG_DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"; }
[ "$(psql_pg "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'")" = 1 ] || psql_pg "CREATE ROLE $ROLE LOGIN"
[ "$(psql_pg "SELECT 1 FROM pg_database WHERE datname='$DB'")" = 1 ] || psql_pg "CREATE DATABASE $DB OWNER $ROLE"
URL="postgresql+psycopg2://$ROLE@127.0.0.1:$PORT/$DB"
echo "$URL" > "$PG_DIR/url"
chmod 644 "$PG_DIR/url"
log "SLIMFORMER_TEST_PG_URL=$URL"
echo "$URL"
