#!/usr/bin/env bash
# End-to-end benchmark: what the spool costs `sync`. The same staging backlog is applied by
# stagingprop to two targets holding the same seed, each through its own slot: "plain" (sync
# applies staging's stream and confirms production's commits) and "spool" (with [spool] on: a
# receiver writes the stream to the spool, fsyncs it and confirms it to staging, while the
# applier applies the spool to production).
#
#   benches/e2e_spool.sh                       # from the repository root
#   BACKLOG_TXNS=5000 PRODUCTS=20000 benches/e2e_spool.sh   # a quicker, smaller run
#
# Each round commits BACKLOG_TXNS pgbench OLTP transactions (the workload of e2e_sync.sh) while
# sync is stopped, then times `sync --until-caught-up` on each target, one after the other; the
# order alternates between rounds. The result is the rows/s of both, their ratio (target: spool
# at least 0.9x plain), and the spool's write throughput (bytes spooled / seconds of the spool
# run). Afterwards both targets are compared with staging row by row; a mismatch fails the run.
#
# Then (b): one staging transaction updating BIG_ROWS offer prices, timed the same way: with the
# spool, the applier starts it only once it is all spooled (not overlapped).
#
# Knobs (environment): PRODUCTS=50000, BACKLOG_TXNS=20000 (per round), ROUNDS=2, CLIENTS=2,
# BIG_ROWS=200000 (0 skips (b)),
# SPOOL_CONF='' (extra [spool] lines, e.g. "segment_bytes = 16777216"), PERF=1 (perf record each
# sync run into the work directory; use with KEEP=1),
# PG_EXTRA_CONF, KEEP=1, STAGINGPROP_PG_BIN, CARGO_TARGET_DIR (as in e2e_sync.sh).
set -euo pipefail

PRODUCTS=${PRODUCTS:-50000}
BACKLOG_TXNS=${BACKLOG_TXNS:-20000}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-2}
# (b): one staging transaction updating this many offer prices, applied by both afterwards.
BIG_ROWS=${BIG_ROWS:-200000}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-spool.XXXXXX")
chmod 755 "$WORK"
trap 'rc=$?; set +e; stop_clusters; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=benches/catalogue.sh
source "$REPO/benches/catalogue.sh"

write_config() {
    local name=$1 extra=
    if [[ $name == spool ]]; then
        extra=$(printf '[spool]\ndir = "%s"\n%s' "$WORK/spool" "${SPOOL_CONF:-}")
    fi
    SP_EXTRA=$extra write_sp_config "$WORK/$name.toml" "$name" "sp_$name" "${TABLES[@]}"
}

spool_bytes() {
    du -sb "$WORK/spool" 2>/dev/null | awk '{ print $1 }' || echo 0
}

# run_sync NAME ROUND: times `sync --until-caught-up`; adds to SECONDS_OF[NAME].
declare -A SECONDS_OF=([plain]=0 [spool]=0) CPU_OF=([plain]=0 [spool]=0)
SPOOLED=0
run_sync() {
    local name=$1 round=$2 t0 t1 rc=0 before after
    q staging -c "CHECKPOINT"
    q "$name" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    before=$(spool_bytes)
    t0=$(now)
    local wrapper=()
    [[ -n ${PERF:-} ]] && wrapper=(perf record -F 2000 -g -o "$WORK/perf.$name.$round" --)
    /usr/bin/time -f '%U %S' -o "$WORK/cpu.$name.$round" \
        "${wrapper[@]}" "$BIN" --config "$WORK/$name.toml" sync --until-caught-up >"$WORK/report.$name.$round.txt" 2>"$WORK/sync.$name.$round.log" || rc=$?
    t1=$(now)
    if (( rc != 0 )); then
        tail -n 30 "$WORK/sync.$name.$round.log" >&2
        die "stagingprop sync to $name failed (exit $rc)"
    fi
    local s
    s=$(elapsed "$t0" "$t1")
    SECONDS_OF[$name]=$(awk -v a="${SECONDS_OF[$name]}" -v b="$s" 'BEGIN { print a + b }')
    CPU_OF[$name]=$(tail -n 1 "$WORK/cpu.$name.$round" | awk -v a="${CPU_OF[$name]}" '{ print a + $1 + $2 }')
    if [[ $name == spool ]]; then
        after=$(spool_bytes)
        SPOOLED=$(( SPOOLED + after - before ))
        log "round $round: $name caught up in $s s, $(( (after - before) / 1000000 )) MB spooled"
    else
        log "round $round: $name caught up in $s s"
    fi
}

log "work directory $WORK; PostgreSQL binaries $PGBIN"
log "loading $PRODUCTS products into all three"
start_with_seed staging plain spool

# Statements of 100 ms or more land in each target's server log, with the application name:
# the worst of stagingprop's is reported (issue 21: no statement may hold a batch for long).
for c in plain spool; do
    qpg "$c" -c "ALTER SYSTEM SET log_min_duration_statement = '100ms'" \
        -c "ALTER SYSTEM SET log_line_prefix = '%m [%p] app=%a '" -c "SELECT pg_reload_conf()" >/dev/null
done

# worst_statement NAME: the longest statement stagingprop ran on the target, in ms ("< 100"
# when none took 100 ms).
worst_statement() {
    grep ' app=stagingprop ' "$WORK/$1/server.log" 2>/dev/null | grep -o 'duration: [0-9.]* ms' |
        awk 'BEGIN { max = -1 } { if ($2 > max) max = $2 } END { if (max < 0) print "< 100"; else printf "%.0f\n", max }'
}

for c in plain spool; do
    write_config "$c"
    "$BIN" --config "$WORK/$c.toml" init >"$WORK/init.$c.log" 2>&1 || { cat "$WORK/init.$c.log" >&2; die "init ($c) failed"; }
done

ROWS=0
for round in $(seq 1 "$ROUNDS"); do
    before=$(rows_written)
    oltp_backlog "$WORK/pgbench.$round.log"
    q staging -c "INSERT INTO bench_marker VALUES ($round, now())"
    rows=$(( $(rows_written) - before ))
    ROWS=$(( ROWS + rows ))
    log "round $round: staging committed $BACKLOG_TXNS transactions changing $rows rows"
    if (( round % 2 == 1 )); then
        run_sync plain "$round"; run_sync spool "$round"
    else
        run_sync spool "$round"; run_sync plain "$round"
    fi
done

BIG_SECONDS=''
if (( BIG_ROWS > 0 )); then
    declare -A BACKLOG_SECONDS=([plain]=${SECONDS_OF[plain]} [spool]=${SECONDS_OF[spool]})
    SECONDS_OF=([plain]=0 [spool]=0)
    before=$(rows_written)
    q staging -c "UPDATE offerprice p SET price = p.price + 1
                    FROM (SELECT offer_id, currency FROM offerprice ORDER BY offer_id, currency LIMIT $BIG_ROWS) s
                   WHERE p.offer_id = s.offer_id AND p.currency = s.currency" \
              -c "INSERT INTO bench_marker VALUES (1000, now())"
    BIG=$(( $(rows_written) - before ))
    log "(b): staging committed one transaction changing $BIG rows"
    run_sync plain big
    run_sync spool big
    BIG_SECONDS="${SECONDS_OF[plain]} ${SECONDS_OF[spool]}"
    SECONDS_OF=([plain]=${BACKLOG_SECONDS[plain]} [spool]=${BACKLOG_SECONDS[spool]})
fi

FAILED=0
s=$(fingerprint staging)
for c in plain spool; do
    t=$(fingerprint "$c")
    if [[ $t == "$s" ]]; then log "$c target MATCH"; else log "$c target MISMATCH: staging $s / $c $t"; FAILED=1; fi
done
(( FAILED == 0 )) || die "a target differs from staging"

{
    echo
    echo "stagingprop spool cost, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version')"
    echo "$ROUNDS rounds of $BACKLOG_TXNS OLTP transactions, $ROWS rows; $(( SPOOLED / 1000000 )) MB spooled"
    printf '%-8s %10s %12s %18s %22s\n' target seconds rows/s "stagingprop CPU s" "worst statement ms"
    for c in plain spool; do
        printf '%-8s %10.2f %12.0f %18.2f %22s\n' "$c" "${SECONDS_OF[$c]}" "$(awk -v r="$ROWS" -v t="${SECONDS_OF[$c]}" 'BEGIN { print r / t }')" "${CPU_OF[$c]}" "$(worst_statement "$c")"
    done
    awk -v a="${SECONDS_OF[plain]}" -v b="${SECONDS_OF[spool]}" -v bytes="$SPOOLED" \
        'BEGIN { printf "spool rows/s = %.2f x plain rows/s (target: at least 0.9x); spool written at %.1f MB/s while catching up\n", a / b, bytes / 1e6 / b }'
    if [[ -n $BIG_SECONDS ]]; then
        read -r bp bs <<<"$BIG_SECONDS"
        awk -v rows="$BIG" -v p="$bp" -v s="$bs" \
            'BEGIN { printf "(b) one transaction of %d rows: plain %.2f s, spool %.2f s: spool = %.2f x plain rows/s\n", rows, p, s, p / s }'
    fi
}
