#!/usr/bin/env bash
# Loading a table with its secondary indexes in place, against loading it without them and
# building them after (two at a time): the measurement behind `copy` setting secondary indexes
# aside (docs/copy.md). Binary COPY from one database to another on a throwaway
# cluster, session_replication_role = replica as copy's sessions; rounds alternate the two.
#
# Knobs: ROWS=1000000, ROUNDS=3, STAGINGPROP_PG_BIN (default: newest /usr/lib/postgresql/*/bin).
set -euo pipefail
ROWS=${ROWS:-1000000}
ROUNDS=${ROUNDS:-3}
BIN=${STAGINGPROP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-index.XXXXXX")
chmod 755 "$WORK"
AS_PG=()
if [[ $(id -u) == 0 ]]; then AS_PG=(runuser -u postgres --); chown postgres: "$WORK"; fi
"${AS_PG[@]}" "$BIN/initdb" -D "$WORK/data" -U postgres -A trust --no-sync >/dev/null
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >>"$WORK/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
autovacuum = off
CONF
"${AS_PG[@]}" "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/log" -w start >/dev/null
trap '"${AS_PG[@]}" "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null; rm -rf "$WORK"' EXIT
q() { "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qAtX -v ON_ERROR_STOP=1 "$@"; }
TABLE="CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL,
  member_id bigint NOT NULL, buyable int, lastupdate timestamptz, field1 text)"
INDEXES=("CREATE INDEX ON catentry (member_id)" "CREATE INDEX ON catentry (lastupdate)"
         "CREATE INDEX ON catentry (partnumber)" "CREATE INDEX ON catentry (field1)")
q -c "CREATE DATABASE src" -c "CREATE DATABASE dst"
q -d src -c "$TABLE" \
  -c "INSERT INTO catentry SELECT g, 'PN-' || g, g % 97, g % 2, now() - g * interval '1 minute',
        md5(g::text) FROM generate_series(1, $ROWS) g" -c "VACUUM ANALYZE catentry"
load() {
    q -d src -c "COPY catentry TO STDOUT (FORMAT binary)" |
        q -d dst -c "SET session_replication_role = replica" -c "COPY catentry FROM STDIN (FORMAT binary)"
}
declare -A total=([with]=0 [rebuilt]=0)
for (( round = 1; round <= ROUNDS; round++ )); do
    for mode in with rebuilt; do
        q -d dst -c "DROP TABLE IF EXISTS catentry" -c "$TABLE"
        if [[ $mode == with ]]; then for i in "${INDEXES[@]}"; do q -d dst -c "$i"; done; fi
        q -c CHECKPOINT
        t0=$(date +%s.%N)
        load
        if [[ $mode == rebuilt ]]; then
            printf '%s\n' "${INDEXES[@]}" |
                xargs -P 2 -I{} "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qAtX -d dst -c "{}"
        fi
        t1=$(date +%s.%N)
        took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
        total[$mode]=$(awk -v s="${total[$mode]}" -v t="$took" 'BEGIN { print s + t }')
        echo "round $round, $mode: $took s"
    done
done
awk -v w="${total[with]}" -v r="${total[rebuilt]}" -v n="$ROUNDS" 'BEGIN {
    printf "mean: loading with 4 secondary indexes %.1f s, without them and building after %.1f s: %.2fx\n",
        w / n, r / n, w / r }'
