#!/usr/bin/env bash
# Proves that a PostgreSQL bin dir (e.g. one printed by scripts/pg-majors.sh) can do what the
# replicator needs: a throwaway cluster with wal_level=logical, a publication, a pgoutput slot,
# and decoded changes for an inserted row. The cluster is removed afterwards, whatever happens.
#
#   scripts/pg-majors-check.sh /root/.cache/stagingprop/pg/16/bin
#
# Queries go through the system psql (PSQL, default /usr/bin/psql), not the bin dir's, so a bin
# dir with only server binaries passes too.
set -euo pipefail

BIN=${1:?usage: $0 BIN_DIR}
PSQL=${PSQL:-/usr/bin/psql}
[[ -x $BIN/initdb && -x $BIN/pg_ctl && -x $BIN/postgres ]] || { echo "no initdb/pg_ctl/postgres in $BIN" >&2; exit 1; }

# PostgreSQL refuses to run as root: run it as the postgres OS user, as src/cluster.rs does.
as_server=()
[[ $(id -u) -ne 0 ]] || as_server=(runuser -u postgres --)

ROOT=$(mktemp -d /tmp/pg-majors-check.XXXXXX)
[[ ${#as_server[@]} -eq 0 ]] || chown postgres: "$ROOT"
cleanup() {
    [[ ! -f $ROOT/data/postmaster.pid ]] ||
        "${as_server[@]}" "$BIN/pg_ctl" -D "$ROOT/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$ROOT"
}
trap cleanup EXIT

# A port nothing listens on now (free_port in src/cluster.rs asks the kernel; close enough here).
while :; do
    PORT=$((20000 + RANDOM % 30000))
    ss -Htln "sport = :$PORT" | grep -q . || break
done

started=$(date +%s.%N)
"${as_server[@]}" env LC_ALL=C "$BIN/initdb" -D "$ROOT/data" -U postgres -A trust -E UTF8 \
    --locale=C --no-sync >"$ROOT/initdb.log" 2>&1 || { cat "$ROOT/initdb.log" >&2; exit 1; }
# Options on the command line rather than in postgresql.conf: nothing to clean up or merge.
"${as_server[@]}" env LC_ALL=C "$BIN/pg_ctl" -D "$ROOT/data" -l "$ROOT/server.log" -w -t 60 \
    -o "-c port=$PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$ROOT -c wal_level=logical -c fsync=off" \
    start >/dev/null || { cat "$ROOT/server.log" >&2; exit 1; }

sql() { "$PSQL" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c "$1"; }

echo "server: $(sql 'SHOW server_version')"
sql "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION p FOR TABLE t" >/dev/null
# Separately: psql -c runs its statements as one transaction, and a slot cannot be created in
# a transaction that has written.
sql "SELECT pg_create_logical_replication_slot('s', 'pgoutput')" >/dev/null
sql "INSERT INTO t VALUES (1, 'one')" >/dev/null
# One letter per pgoutput message (B=begin, R=relation, I=insert, C=commit).
changes=$(sql "SELECT string_agg(chr(get_byte(data, 0)), ' ' ORDER BY lsn)
               FROM pg_logical_slot_get_binary_changes('s', NULL, NULL,
                    'proto_version', '1', 'publication_names', 'p')")
echo "pgoutput messages: $changes"
[[ $changes == *I* ]] || { echo "FAIL: no insert decoded" >&2; exit 1; }
"${as_server[@]}" "$BIN/pg_ctl" -D "$ROOT/data" -m fast -w stop >/dev/null
echo "OK ($(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s)"
