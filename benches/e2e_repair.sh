#!/usr/bin/env bash
# End-to-end benchmark: online repair (`verify --repair`) against re-seeding the table with
# `copy --truncate`, in the same run on the same data (docs/repair.md).
#
#   benches/e2e_repair.sh                         # from the repository root: 10M rows
#   ROWS=1000000 benches/e2e_repair.sh            # quicker
#
# Staging and production hold the same ROWS-row table `item` (bigint key, ~100 bytes a row) and
# a small table `probe`; stagingprop syncs both. Then:
#   1. Drift: on production, DRIFT_PERCENT % of item's rows change, in DRIFT_CHUNKS chunks of
#      CHUNK_ROWS keys spread evenly over the table (per chunk: 80 % updated, 20 % deleted).
#   2. Lag without a repair: for PROBE_SECONDS, a probe row is inserted on staging every 100 ms
#      and the time until it is on production measured (polled every 10 ms); p50/p99.
#   3. `stagingprop verify --repair --table public.item --chunk-rows CHUNK_ROWS` while sync runs
#      and the probe keeps measuring: its wall time, and the probe's p50/p99 meanwhile.
#   4. The same drift again, then sync stopped and `stagingprop copy --from staging --to
#      production --tables public.item --truncate` (its own slot): its wall time.
#   5. A table `added` of ADD_ROWS rows, on staging only, joins the config while sync runs
#      (`init` registers its seeding, sync restarts with the new config) and is seeded with
#      `stagingprop resync --table public.added` while the probe measures; then, sync stopped,
#      the same table emptied and loaded with `copy --tables public.added --truncate`.
# Every end is checked with `stagingprop verify` (exit 0). Printed: the times and ratios
# (target for the repair: at least 10x sooner than the copy), and the probe's lag meanwhile.
#
# Knobs (environment): ROWS=10000000, ADD_ROWS=5000000 (0: skip phase 5), DRIFT_PERCENT=1,
# DRIFT_CHUNKS=100, CHUNK_ROWS=10000, PROBE_SECONDS=20, JOBS=2, PG_EXTRA_CONF, KEEP,
# STAGINGPROP_PG_BIN, SP_BIN, CARGO_TARGET_DIR.
set -euo pipefail

ROWS=${ROWS:-10000000}
ADD_ROWS=${ADD_ROWS:-5000000}
DRIFT_PERCENT=${DRIFT_PERCENT:-1}
DRIFT_CHUNKS=${DRIFT_CHUNKS:-100}
CHUNK_ROWS=${CHUNK_ROWS:-10000}
PROBE_SECONDS=${PROBE_SECONDS:-20}
JOBS=${JOBS:-2}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}
MAX_PREPARED=$(( JOBS + 2 ))

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-repair.XXXXXX")
chmod 755 "$WORK"
SYNC_PID=''
PROBE_PID=''
cleanup() {
    local rc=$?
    set +e
    [[ -n $PROBE_PID ]] && kill "$PROBE_PID" 2>/dev/null
    [[ -n $SYNC_PID ]] && kill "$SYNC_PID" 2>/dev/null && wait "$SYNC_PID" 2>/dev/null
    stop_clusters
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SCHEMA_SQL="
CREATE TABLE item (id bigint PRIMARY KEY, sku text NOT NULL, price numeric(12,2), name text,
                   updated timestamptz);
CREATE TABLE probe (id bigint PRIMARY KEY, at timestamptz NOT NULL);
CREATE TABLE added (id bigint PRIMARY KEY, sku text NOT NULL, price numeric(12,2), name text,
                    updated timestamptz);"
LOAD_SQL="INSERT INTO item SELECT g, 'SKU-' || g, (g % 1000) + 0.99, 'item number ' || g,
                                  '2026-01-01'::timestamptz + g * interval '1 second'
            FROM generate_series(1, $ROWS) g"
ADD_SQL="INSERT INTO added SELECT g, 'ADD-' || g, (g % 1000) + 0.99, 'added number ' || g,
                                  '2026-01-01'::timestamptz + g * interval '1 second'
            FROM generate_series(1, $ADD_ROWS) g"

log "work directory $WORK; PostgreSQL binaries $PGBIN; $ROWS rows"
for c in staging production; do
    start_cluster "$c"
    qpg "$c" -c "CREATE DATABASE shop"
    q "$c" -c "$SCHEMA_SQL"
done
log "loading $ROWS rows on both sides"
q staging -c "$LOAD_SQL" &
q production -c "$LOAD_SQL"
wait
if (( ADD_ROWS > 0 )); then
    q staging -c "$ADD_SQL" -c "VACUUM ANALYZE added"
fi
for c in staging production; do q "$c" -c "VACUUM ANALYZE item" -c "CHECKPOINT"; done

write_sp_config "$WORK/sync.toml" production sp_repair item probe
"$BIN" --config "$WORK/sync.toml" init >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; die "init failed"; }

start_sync() {
    "$BIN" --config "$WORK/sync.toml" sync >>"$WORK/sync.log" 2>&1 &
    SYNC_PID=$!
}
stop_sync() {
    kill "$SYNC_PID"
    wait "$SYNC_PID" || true
    SYNC_PID=''
}

# Drift: DRIFT_CHUNKS chunks (keys [c * stride, c * stride + CHUNK_ROWS), one verify bucket
# each), each with its share of the drifted rows spread evenly: 80 % updated, 20 % deleted.
drift() {
    local per_chunk=$(( ROWS * DRIFT_PERCENT / 100 / DRIFT_CHUNKS ))
    local stride=$(( ROWS / DRIFT_CHUNKS ))
    local step=$(( CHUNK_ROWS / per_chunk ))
    local picked="id % $stride < $CHUNK_ROWS AND id % $stride % $step = 0"
    local nth="id % $stride / $step"
    q production -c "SET session_replication_role = replica;
        UPDATE item SET price = price + 1000, name = 'drifted'
         WHERE $picked AND $nth < $(( per_chunk * 8 / 10 ));
        DELETE FROM item WHERE $picked AND $nth >= $(( per_chunk * 8 / 10 ));
        CHECKPOINT;" >/dev/null
    q production -c "SELECT count(*) FILTER (WHERE name = 'drifted'), $ROWS - count(*) FROM item"
}

# The probe: one row a 100 ms on staging, each one's delay until production has it, in ms.
probe() {
    local out=$1 seconds=$2 n=0 start until
    until=$(( $(date +%s) + seconds ))
    : >"$out"
    while (( $(date +%s) < until )); do
        n=$(( n + 1 ))
        id=$(( $(date +%s%N) ))
        start=$(now)
        q staging -c "INSERT INTO probe VALUES ($id, now())"
        while [[ -z $(q production -c "SELECT 1 FROM probe WHERE id = $id") ]]; do sleep 0.01; done
        awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.0f\n", (b - a) * 1000 }' >>"$out"
        sleep 0.1
    done
}
percentile() {
    sort -n "$1" | awk -v p="$2" '{ v[NR] = $1 } END { i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; print v[i] }'
}

verify_matches() {
    "$BIN" --config "$WORK/sync.toml" verify --table public.item >"$WORK/verify.$1.log" 2>&1 \
        || { cat "$WORK/verify.$1.log" >&2; die "verify after $1: production differs"; }
}

start_sync
log "drift: $(drift | tr '|' ' ') (rows drifted, rows deleted)"

log "probe for ${PROBE_SECONDS}s without a repair"
probe "$WORK/lag.quiet" "$PROBE_SECONDS"

log "verify --repair (the probe keeps measuring)"
probe "$WORK/lag.repair" 100000 &
PROBE_PID=$!
t0=$(now)
"$BIN" --config "$WORK/sync.toml" verify --repair --table public.item --chunk-rows "$CHUNK_ROWS" \
    >"$WORK/repair.out" 2>"$WORK/repair.log" || { cat "$WORK/repair.out" "$WORK/repair.log" >&2; die "repair failed"; }
t1=$(now)
kill "$PROBE_PID" 2>/dev/null || true
wait "$PROBE_PID" 2>/dev/null || true
PROBE_PID=''
REPAIR_S=$(elapsed "$t0" "$t1")
cat "$WORK/repair.out" >&2
verify_matches repair
stop_sync

log "the same drift again, then copy --truncate of the table"
log "drift: $(drift | tr '|' ' ')"
SP_EXTRA='' write_sp_config "$WORK/copy.toml" production sp_copy item
t0=$(now)
"$BIN" --config "$WORK/copy.toml" copy --from staging --to production --tables public.item \
    --truncate --jobs "$JOBS" >"$WORK/copy.log" 2>&1 || { cat "$WORK/copy.log" >&2; die "copy failed"; }
t1=$(now)
COPY_S=$(elapsed "$t0" "$t1")
verify_matches copy

if (( ADD_ROWS > 0 )); then
    log "adding table added ($ADD_ROWS rows on staging) to the running config"
    write_sp_config "$WORK/added.toml" production sp_repair item probe added
    start_sync
    sleep 2
    "$BIN" --config "$WORK/added.toml" init >"$WORK/init.added.log" 2>&1 || { cat "$WORK/init.added.log" >&2; die "init (added) failed"; }
    grep -q "added to a running target" "$WORK/init.added.log" || { cat "$WORK/init.added.log" >&2; die "init did not register the seeding"; }
    stop_sync
    "$BIN" --config "$WORK/added.toml" sync >>"$WORK/sync.log" 2>&1 &
    SYNC_PID=$!
    probe "$WORK/lag.seed" 100000 &
    PROBE_PID=$!
    t0=$(now)
    "$BIN" --config "$WORK/added.toml" resync --table public.added --chunk-rows "$CHUNK_ROWS" \
        >"$WORK/resync.out" 2>"$WORK/resync.log" || { cat "$WORK/resync.out" "$WORK/resync.log" >&2; die "resync failed"; }
    t1=$(now)
    kill "$PROBE_PID" 2>/dev/null || true
    wait "$PROBE_PID" 2>/dev/null || true
    PROBE_PID=''
    SEED_S=$(elapsed "$t0" "$t1")
    cat "$WORK/resync.out" >&2
    "$BIN" --config "$WORK/added.toml" verify --table public.added >"$WORK/verify.seed.log" 2>&1 \
        || { cat "$WORK/verify.seed.log" >&2; die "verify after the seeding: production differs"; }
    stop_sync
    q production -c "TRUNCATE added" -c "CHECKPOINT"
    write_sp_config "$WORK/copy.added.toml" production sp_copy_added added
    t0=$(now)
    "$BIN" --config "$WORK/copy.added.toml" copy --from staging --to production --tables public.added \
        --truncate --jobs "$JOBS" >"$WORK/copy.added.log" 2>&1 || { cat "$WORK/copy.added.log" >&2; die "copy (added) failed"; }
    t1=$(now)
    COPY_ADDED_S=$(elapsed "$t0" "$t1")
fi

quiet50=$(percentile "$WORK/lag.quiet" 50); quiet99=$(percentile "$WORK/lag.quiet" 99)
rep50=$(percentile "$WORK/lag.repair" 50); rep99=$(percentile "$WORK/lag.repair" 99)
printf '\nonline repair of %s rows, %s%% drifted in %s chunks of %s keys (PostgreSQL %s)\n' \
    "$ROWS" "$DRIFT_PERCENT" "$DRIFT_CHUNKS" "$CHUNK_ROWS" "$("$PGBIN/postgres" --version | awk '{print $3}')"
printf '%-40s %10s s\n' "verify --repair (sync running)" "$REPAIR_S"
printf '%-40s %10s s\n' "copy --truncate --tables public.item" "$COPY_S"
awk -v r="$REPAIR_S" -v c="$COPY_S" 'BEGIN { printf "%-40s %10.1fx sooner (target: 10x)\n", "repair against copy", c / r }'
printf '%-40s p50 %5s ms, p99 %5s ms (%s probes)\n' "other table's lag, no repair" "$quiet50" "$quiet99" "$(wc -l <"$WORK/lag.quiet")"
printf '%-40s p50 %5s ms, p99 %5s ms (%s probes)\n' "other table's lag, during the repair" "$rep50" "$rep99" "$(wc -l <"$WORK/lag.repair")"
if (( ADD_ROWS > 0 )); then
    printf '\na table of %s rows added to the running config\n' "$ADD_ROWS"
    printf '%-40s %10s s\n' "resync --table public.added (online)" "$SEED_S"
    printf '%-40s %10s s\n' "copy --tables public.added (sync stopped)" "$COPY_ADDED_S"
    awk -v r="$SEED_S" -v c="$COPY_ADDED_S" 'BEGIN { printf "%-40s %10.2f\n", "seeding time / copy time", r / c }'
    printf '%-40s p50 %5s ms, p99 %5s ms (%s probes)\n' "other table's lag, during the seeding" \
        "$(percentile "$WORK/lag.seed" 50)" "$(percentile "$WORK/lag.seed" 99)" "$(wc -l <"$WORK/lag.seed")"
fi
