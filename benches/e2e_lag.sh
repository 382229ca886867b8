#!/usr/bin/env bash
# End-to-end benchmark: the lag a merchandiser sees while staging is busy. How long after its
# commit on staging is a change visible on production, for stagingprop `sync` and for
# PostgreSQL's own logical replication, on the same workload in the same run.
#
#   benches/e2e_lag.sh                                  # from the repository root
#   RATES="200 1000" SECONDS_PER_RATE=20 benches/e2e_lag.sh   # a quicker run
#
# Three throwaway clusters (staging; "prod", stagingprop's target; "native", a subscriber) hold
# the catalogue of e2e_sync.sh plus a replicated lag_probe table. At each rate, for each system
# in turn (the other one stopped), pgbench runs the OLTP workload of e2e_sync.sh at that rate
# (-R; "max" is as fast as staging goes) for SECONDS_PER_RATE seconds, with one transaction in
# ten a probe: a row whose staged_at is clock_timestamp() at the end of its one-statement staging
# transaction. On the target a watcher session polls every 2 ms for probe rows it has not seen
# and records when it first saw each (probe_seen, not replicated): seen minus staged_at is the
# probe's lag, the time until a reader on production sees the change, read with the same clock
# (both clusters are on this machine). (Commit timestamps cannot be used: a subscriber records
# the origin's commit time for what it applies.) Each system first catches up with what it
# missed, so only the probes of its own phase count. The script prints p50, p95, p99 and max per
# system and rate, and the ratios.
#
# Variants (VARIANTS, space-separated): plain (stagingprop's defaults), spool ([spool] on), remap
# (catentry remap-on-conflict: catentry and every table referencing it are translated through the
# key map). The native subscription runs once per rate.
#
# Knobs: PRODUCTS=50000, RATES="200 1000 max", SECONDS_PER_RATE=60, CLIENTS=2,
# VARIANTS="plain spool remap", SYNC_CONF='' (extra [sync] lines, ';'-separated),
# PG_EXTRA_CONF, KEEP=1, STAGINGPROP_PG_BIN, CARGO_TARGET_DIR, SP_BIN (a built binary).
set -euo pipefail

PRODUCTS=${PRODUCTS:-50000}
RATES=${RATES:-"200 1000 max"}
SECONDS_PER_RATE=${SECONDS_PER_RATE:-60}
CLIENTS=${CLIENTS:-2}
VARIANTS=${VARIANTS:-"plain spool remap"}
SYNC_CONF=${SYNC_CONF:-}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}
BIG_ROWS=0

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-lag.XXXXXX")
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

# shellcheck source=benches/catalogue.sh
source "$REPO/benches/catalogue.sh"

PROBE_SQL="CREATE TABLE lag_probe (id bigint PRIMARY KEY, phase int NOT NULL, staged_at timestamptz NOT NULL);
CREATE SEQUENCE probe_seq;"
cat >"$WORK/probe.sql" <<'EOF'
INSERT INTO lag_probe VALUES (nextval('probe_seq'), :phase, clock_timestamp());
EOF

log "work directory $WORK; PostgreSQL binaries $PGBIN"
log "loading $PRODUCTS products into all three"
EXTRA_SCHEMA_SQL=$PROBE_SQL start_with_seed staging prod native
for c in prod native; do
    q "$c" -c "CREATE TABLE probe_seen (id bigint PRIMARY KEY, seen_at timestamptz NOT NULL)"
done

TABLES_LAG=(catentry catentdesc offer offerprice bench_marker lag_probe)
SP_SYNC=$SYNC_CONF
write_sp_config "$WORK/init.toml" prod stagingprop "${TABLES_LAG[@]}"
"$BIN" --config "$WORK/init.toml" init >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; die "stagingprop init failed"; }
q native -c "CREATE SUBSCRIPTION bench_native
               CONNECTION 'host=127.0.0.1 port=${PORT[staging]} dbname=shop user=postgres'
               PUBLICATION stagingprop
               WITH (copy_data = false, enabled = false, slot_name = 'bench_native')"

# config VARIANT: the config file of a stagingprop variant (same slot and target throughout).
config_of() {
    local variant=$1
    SP_RULES=()
    SP_EXTRA=''
    case $variant in
        plain) ;;
        spool) SP_EXTRA="[spool]
dir = \"$WORK/spool\"" ;;
        remap)
            # Every change of catentry and of the tables referencing it goes through the key map.
            SP_RULES[catentry]='key = { rule = "remap-on-conflict", sequence = "public.newprod_seq" }'
            ;;
        *) die "unknown variant $variant (plain, spool, remap)" ;;
    esac
    write_sp_config "$WORK/$variant.toml" prod stagingprop "${TABLES_LAG[@]}"
    echo "$WORK/$variant.toml"
}

MARKER=0
# wait_marker CLUSTER: a new marker row on staging, visible on CLUSTER (the applier caught up).
wait_marker() {
    MARKER=$((MARKER + 1))
    q staging -c "INSERT INTO bench_marker VALUES ($MARKER, now())"
    q "$1" -c "DO \$\$ BEGIN
                 WHILE NOT EXISTS (SELECT 1 FROM bench_marker WHERE id = $MARKER) LOOP
                     PERFORM pg_sleep(0.02);
                 END LOOP;
               END \$\$"
}

# workload PHASE RATE: pgbench for SECONDS_PER_RATE seconds at RATE transactions/s (or max).
workload() {
    local phase=$1 rate=$2 limit=()
    [[ $rate == max ]] || limit=(-R "$rate")
    "$PGBIN/pgbench" -n -h 127.0.0.1 -p "${PORT[staging]}" -U postgres -c "$CLIENTS" -j "$CLIENTS" \
        "${limit[@]}" -T "$SECONDS_PER_RATE" -D products="$PRODUCTS" -D clients="$CLIENTS" -D phase="$phase" \
        -f "$WORK/oltp.sql@9" -f "$WORK/probe.sql@1" shop >"$WORK/pgbench.$phase.log" 2>&1 ||
        { cat "$WORK/pgbench.$phase.log" >&2; die "pgbench failed"; }
    awk '/^tps = / { printf "%.0f", $3 }' "$WORK/pgbench.$phase.log"
}

# watch CLUSTER PHASE: in the background until $WORK/stop.PHASE exists, records when each probe
# row of PHASE becomes visible on CLUSTER. Probe ids grow with staging's commit order up to the
# few transactions the clients interleave, so it looks only just below the highest seen.
WATCH_PID=''
watch() {
    local cluster=$1 phase=$2
    rm -f "$WORK/stop.$phase"
    (
        q "$cluster" -c "DO \$\$ DECLARE hi bigint := 0; BEGIN
              WHILE NOT EXISTS (SELECT 1 FROM bench_marker WHERE id = -$phase) LOOP
                  INSERT INTO probe_seen SELECT p.id, clock_timestamp() FROM lag_probe p
                   WHERE p.phase = $phase AND p.id > hi - 64 ON CONFLICT (id) DO NOTHING;
                  SELECT coalesce(max(id), 0) INTO hi FROM probe_seen WHERE id > hi - 64;
                  PERFORM pg_sleep(0.002);
              END LOOP;
          END \$\$"
    ) &
    WATCH_PID=$!
}

# unwatch PHASE: ends the watcher (a marker row only it waits for).
unwatch() {
    q staging -c "INSERT INTO bench_marker VALUES (-$1, now())"
    wait "$WATCH_PID" || die "the probe watcher failed"
    WATCH_PID=''
}

# lag CLUSTER PHASE: "probes p50 p95 p99 max" in ms for the phase's probes on CLUSTER, then the
# percentage of probes seen more than 20 ms late (how much of the run was spent behind).
lag() {
    q "$1" -F ' ' -c "SELECT count(*), round(percentile_cont(0.5) WITHIN GROUP (ORDER BY l)::numeric, 1),
                             round(percentile_cont(0.95) WITHIN GROUP (ORDER BY l)::numeric, 1),
                             round(percentile_cont(0.99) WITHIN GROUP (ORDER BY l)::numeric, 1),
                             round(max(l)::numeric, 1), round(100.0 * avg((l > 20)::int), 1)
                        FROM (SELECT extract(epoch FROM s.seen_at - p.staged_at) * 1000 AS l
                                FROM lag_probe p JOIN probe_seen s USING (id) WHERE p.phase = $2) x"
}

PHASE=0
declare -a LINES=()
run_stagingprop() {
    local variant=$1 rate=$2 config tps
    config=$(config_of "$variant")
    PHASE=$((PHASE + 1))
    "$BIN" --config "$config" sync >"$WORK/sync.$variant.$PHASE.out" 2>"$WORK/sync.$variant.$PHASE.log" &
    SYNC_PID=$!
    wait_marker prod
    watch prod "$PHASE"
    tps=$(workload "$PHASE" "$rate")
    wait_marker prod
    unwatch "$PHASE"
    kill "$SYNC_PID"
    wait "$SYNC_PID" || die "stagingprop sync ($variant) failed: $(tail -n 5 "$WORK/sync.$variant.$PHASE.log")"
    SYNC_PID=''
    LINES+=("$rate stagingprop-$variant $tps $(lag prod "$PHASE")")
    log "rate $rate: stagingprop ($variant) at $tps tps: $(lag prod "$PHASE")"
}

run_native() {
    local rate=$1 tps
    PHASE=$((PHASE + 1))
    q native -c "ALTER SUBSCRIPTION bench_native ENABLE"
    wait_marker native
    watch native "$PHASE"
    tps=$(workload "$PHASE" "$rate")
    wait_marker native
    unwatch "$PHASE"
    q native -c "ALTER SUBSCRIPTION bench_native DISABLE"
    # The launcher may restart a disabled subscription's worker for a moment: let it settle.
    sleep 1
    LINES+=("$rate native $tps $(lag native "$PHASE")")
    log "rate $rate: native at $tps tps: $(lag native "$PHASE")"
}

for rate in $RATES; do
    run_native "$rate"
    for variant in $VARIANTS; do
        run_stagingprop "$variant" "$rate"
    done
done

{
    echo
    echo "stagingprop lag, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version')"
    echo "$SECONDS_PER_RATE s per rate and system, OLTP workload with one probe in ten transactions; lag in ms from staging commit to a reader on production seeing it (2 ms polls)"
    printf '%-6s %-20s %7s %7s %8s %8s %8s %8s %8s\n' rate system tps probes p50 p95 p99 max '>20ms %'
    for line in "${LINES[@]}"; do
        # shellcheck disable=SC2086
        printf '%-6s %-20s %7s %7s %8s %8s %8s %8s %8s\n' $line
    done
    echo
    echo "ratios (stagingprop / native; below 1 is lower lag than native):"
    for rate in $RATES; do
        read -r _ _ _ _ np50 _ np99 _ < <(printf '%s\n' "${LINES[@]}" | awk -v r="$rate" '$1 == r && $2 == "native"')
        for line in "${LINES[@]}"; do
            read -r r system _ _ p50 _ p99 _ <<<"$line"
            [[ $r == "$rate" && $system != native ]] || continue
            awk -v r="$rate" -v s="$system" -v a="$p50" -v b="$np50" -v c="$p99" -v d="$np99" \
                'BEGIN { printf "  rate %-5s %-20s p50 %.2f x native, p99 %.2f x native\n", r, s, a / b, c / d }'
        done
    done
}
