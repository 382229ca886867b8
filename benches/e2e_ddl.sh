#!/usr/bin/env bash
# End-to-end benchmark: schema changes on a large managed table while shoppers write to it on
# production. For each change, how long until production has it, and the p99 latency of the
# shoppers' writes to that table meanwhile, against doing the same on production by hand.
#
#   benches/e2e_ddl.sh                          # from the repository root
#   ROWS=200000 ROUNDS=1 benches/e2e_ddl.sh     # a quicker run
#
# Two throwaway clusters (staging, prod) hold catentry with ROWS rows, the same on both; sync
# runs throughout. Shoppers: pgbench on prod at RATE transactions/s, each updating the stock of
# a random product, with a per-transaction latency log. Phases, one
# after the other, each inside its own pgbench run of PHASE_SECONDS:
#   - idle:          nothing changes (the baseline p99)
#   - sync index:    CREATE INDEX on staging; stagingprop builds it on production
#                    (CREATE INDEX CONCURRENTLY after the change's transaction)
#   - hand CIC:      the same index built by hand on production with CONCURRENTLY
#   - hand plain:    the same index built by hand without CONCURRENTLY (what blocks shoppers)
#   - sync column:   ALTER TABLE ... ADD COLUMN ... DEFAULT on staging, applied by sync
# "until there" is from the statement's start to the index (valid) or column on production; p99
# counts the shoppers' transactions that ended in that window (at least one second of it).
# ROUNDS rounds of every phase but "hand plain" (round 1 only: it blocks the shoppers); the two
# index builds alternate which goes first, and the column is dropped on staging (and so on
# production) after each round. The report gives each round's figures and the median and spread
# of the ratios through sync / by hand.
#
# Knobs: ROWS=1000000, RATE=200, PHASE_SECONDS=20, ROUNDS=3, PG_EXTRA_CONF, KEEP=1,
# STAGINGPROP_PG_BIN, CARGO_TARGET_DIR, SP_BIN (a built binary).
set -euo pipefail

ROWS=${ROWS:-1000000}
RATE=${RATE:-200}
PHASE_SECONDS=${PHASE_SECONDS:-20}
ROUNDS=${ROUNDS:-3}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-ddl.XXXXXX")
chmod 755 "$WORK"
SYNC_PID=''
cleanup() {
    local rc=$?
    set +e
    if [[ -n $SYNC_PID ]] && kill -0 "$SYNC_PID" 2>/dev/null; then
        kill "$SYNC_PID"
        wait "$SYNC_PID" 2>/dev/null
    fi
    stop_clusters
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "work directory $WORK; PostgreSQL binaries $PGBIN"
start_cluster staging
start_cluster prod
SCHEMA="CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL,
  member_id bigint NOT NULL, price numeric(12,2), lastupdate timestamptz, stock int NOT NULL DEFAULT 0)"
for c in staging prod; do
    qpg "$c" -c "CREATE DATABASE shop"
    q "$c" -c "$SCHEMA" \
        -c "INSERT INTO catentry SELECT g, 'PN-' || g, g % 97, (g % 1000) / 10.0,
              timestamptz '2026-01-01' + g * interval '1 second', 100 FROM generate_series(1, $ROWS) g" \
        -c "VACUUM ANALYZE catentry"
done
log "$ROWS products on both"

# Staging changes no rows here: the shoppers' stock updates on production stay as they are.
write_sp_config "$WORK/sync.toml" prod stagingprop catentry
"$BIN" --config "$WORK/sync.toml" init >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; die "stagingprop init failed"; }
"$BIN" --config "$WORK/sync.toml" sync >"$WORK/sync.log" 2>&1 &
SYNC_PID=$!

cat >"$WORK/shopper.sql" <<EOF
\set id random(1, $ROWS)
UPDATE catentry SET stock = stock - 1 WHERE catentry_id = :id;
EOF

# wait_for CLUSTER SQL: polls SQL (a boolean) on CLUSTER every 20 ms until it is true, a query
# at a time (one long transaction would hold the snapshot a concurrent index build waits out).
wait_for() {
    until [[ $(q "$1" -c "SELECT $2") == t ]]; do sleep 0.02; done
}

INDEX_THERE="EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('catentry_price_idx') AND indisvalid)"
COLUMN_THERE="EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'catentry'::regclass AND attname = 'buyable' AND NOT attisdropped)"

# run_phase NAME: pgbench on prod for PHASE_SECONDS with the phase's change started after 3 s;
# prints "NAME until_there_s p99_ms baseline_window_p99_ms".
run_phase() {
    local name=$1 start end
    rm -f "$WORK"/pgbench_log.*
    (cd "$WORK" && "$PGBIN/pgbench" -n -h 127.0.0.1 -p "${PORT[prod]}" -U postgres -c 2 -j 2 \
        -R "$RATE" -T "$PHASE_SECONDS" -l -f "$WORK/shopper.sql" shop >"$WORK/pgbench.$name.log" 2>&1) &
    local bench=$!
    sleep 3
    start=$(now)
    case $name in
        idle) sleep 5 ;;
        sync_index)
            q staging -c "CREATE INDEX catentry_price_idx ON catentry (price, lastupdate)"
            wait_for prod "$INDEX_THERE" ;;
        hand_cic)
            q prod -c "CREATE INDEX CONCURRENTLY catentry_price_idx ON catentry (price, lastupdate)" ;;
        hand_plain)
            q prod -c "CREATE INDEX catentry_price_idx ON catentry (price, lastupdate)" ;;
        sync_column)
            q staging -c "ALTER TABLE catentry ADD COLUMN buyable int NOT NULL DEFAULT 1"
            wait_for prod "$COLUMN_THERE" ;;
    esac
    end=$(now)
    wait "$bench" || { cat "$WORK/pgbench.$name.log" >&2; die "pgbench failed in phase $name"; }
    # pgbench's log: client, transaction, latency (us), script, epoch s, us (at its end).
    cat "$WORK"/pgbench_log.* | awk -v s="$start" -v e="$end" -v n="$name" '
        { t = $5 + $6 / 1e6; if (e - s < 1) { e = s + 1 } if (t >= s && t <= e) print $3 / 1000 }' |
        sort -n | awk -v n="$name" -v took="$(elapsed "$start" "$end")" '
        { v[NR] = $1 } END {
            if (NR == 0) { printf "%s %s - 0\n", n, took; exit }
            i = int(NR * 0.99); if (i < 1) i = 1
            printf "%s %s %.1f %d\n", n, took, v[i], NR }'
}

# drop_index: the index gone from both sides before the next phase builds it again.
drop_index() {
    q staging -c "DROP INDEX IF EXISTS catentry_price_idx"
    wait_for prod "NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'catentry_price_idx')"
    q prod -c "CHECKPOINT"
}

drop_hand_index() { q prod -c "DROP INDEX catentry_price_idx" -c CHECKPOINT; }

# Lines "ROUND NAME until_there_s p99_ms writes".
RESULTS=()
for (( round = 1; round <= ROUNDS; round++ )); do
    log "round $round"
    RESULTS+=("$round $(run_phase idle)")
    if (( round % 2 == 1 )); then
        RESULTS+=("$round $(run_phase sync_index)")
        drop_index
        RESULTS+=("$round $(run_phase hand_cic)")
        drop_hand_index
    else
        RESULTS+=("$round $(run_phase hand_cic)")
        drop_hand_index
        RESULTS+=("$round $(run_phase sync_index)")
        drop_index
    fi
    if (( round == 1 )); then
        RESULTS+=("$round $(run_phase hand_plain)")
        drop_hand_index
    fi
    RESULTS+=("$round $(run_phase sync_column)")
    q staging -c "ALTER TABLE catentry DROP COLUMN buyable"
    wait_for prod "NOT $COLUMN_THERE"
done
grep -q "schema change" "$WORK/sync.log" || { tail -n 20 "$WORK/sync.log" >&2; die "sync logged no schema change"; }

echo
echo "$ROWS rows, shoppers at $RATE updates/s on production (p99 of those ending in the window), $ROUNDS rounds"
printf '%5s %-12s %14s %10s %8s\n' round phase 'until there s' 'p99 ms' writes
for line in "${RESULTS[@]}"; do
    read -r round name took p99 count <<<"$line"
    printf '%5s %-12s %14s %10s %8s\n' "$round" "$name" "$took" "$p99" "$count"
done
# of ROUND PHASE FIELD: a phase's figure in a round (2: until there, 3: p99).
of() { printf '%s\n' "${RESULTS[@]}" | awk -v r="$1" -v n="$2" -v f="$3" '$1 == r && $2 == n { print $(f + 1) }'; }
times='' p99s=''
for (( round = 1; round <= ROUNDS; round++ )); do
    times+=" $(ratio "$(of "$round" sync_index 2)" "$(of "$round" hand_cic 2)")"
    p99s+=" $(ratio "$(of "$round" sync_index 3)" "$(of "$round" hand_cic 3)")"
done
echo "index through sync / by hand with CONCURRENTLY, median (min-max): time $(spread "$times"), shoppers' p99 $(spread "$p99s")"
