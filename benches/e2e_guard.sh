#!/usr/bin/env bash
# End-to-end benchmark: what the production guard costs (docs/guard.md).
#
#   benches/e2e_guard.sh                                   # from the repository root
#   BACKLOG_TXNS=5000 PRODUCTS=20000 SECONDS_EACH=5 benches/e2e_guard.sh   # quicker
#
# 1. Production's own writes. On a production holding the catalogue (offerprice partly managed:
#    merchant_price is production's), a merchant role runs pgbench for SECONDS_EACH seconds per
#    guard mode, the modes alternating in order between ROUNDS rounds: single-row updates of
#    production's own column (allowed under every mode) and of the managed price (allowed under
#    off and record, which records each). Printed: transactions/s per mode and each guarded
#    mode's cost against off (target: at most 10%).
# 2. Sync's catch-up. The same staging backlog (BACKLOG_TXNS pgbench OLTP transactions per
#    round, the workload of e2e_sync.sh) is applied by stagingprop to two targets: "plain"
#    (guard off) and "guarded" (guard = "record" on every table: sync locks the rows it updates
#    or deletes and leaves rows with an open production edit), one after the other, the order
#    alternating. Both sync as the same plain role that owns the tables. Printed: rows/s of each
#    and the guard's cost (target: at most 10%). Both targets must end equal to staging.
#
# Knobs (environment): PRODUCTS=50000, BACKLOG_TXNS=20000, ROUNDS=3, CLIENTS=2, SECONDS_EACH=10,
# PG_EXTRA_CONF, STAGINGPROP_PG_BIN, CARGO_TARGET_DIR (as in e2e_sync.sh).
set -euo pipefail

PRODUCTS=${PRODUCTS:-50000}
BACKLOG_TXNS=${BACKLOG_TXNS:-20000}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-2}
SECONDS_EACH=${SECONDS_EACH:-10}
BIG_ROWS=0
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-guard.XXXXXX")
chmod 755 "$WORK"
trap 'rc=$?; set +e; stop_clusters; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=benches/catalogue.sh
source "$REPO/benches/catalogue.sh"
EXTRA_SCHEMA_SQL="ALTER TABLE offerprice ADD COLUMN merchant_price numeric(20,5);"

# The role stagingprop logs in to production as (owning the tables, as the guard needs) and the
# merchant's.
own_tables() {
    q "$1" -c "CREATE ROLE sp LOGIN; CREATE ROLE merchant LOGIN; GRANT CREATE ON DATABASE shop TO sp" \
        -c "DO \$\$ DECLARE t text; BEGIN
              FOR t IN SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace LOOP
                EXECUTE format('ALTER TABLE %I OWNER TO sp', t);
              END LOOP; END \$\$" \
        -c "GRANT ALL ON ALL TABLES IN SCHEMA public TO merchant"
}

write_config() {
    local name=$1 guard=$2
    SP_RULES=([offerprice]='exclude_columns = ["merchant_price"]')
    SP_PRODUCTION_USER=sp SP_EXTRA="[guard]
default = \"$guard\"" write_sp_config "$WORK/$name.$guard.toml" "$name" "sp_$name" "${TABLES[@]}"
}

init_as() {
    local name=$1 guard=$2
    "$BIN" --config "$WORK/$name.$guard.toml" init >"$WORK/init.$name.$guard.log" 2>&1 \
        || { cat "$WORK/init.$name.$guard.log" >&2; die "init ($name, guard $guard) failed"; }
}

log "work directory $WORK; PostgreSQL binaries $PGBIN"
log "loading $PRODUCTS products into staging and both targets"
start_with_seed staging plain guarded
own_tables plain
own_tables guarded
write_config plain off
for g in off record refuse; do write_config guarded "$g"; done
init_as plain off
init_as guarded record

# --- 1. production's own writes ---------------------------------------------------------------
cat >"$WORK/own.sql" <<'SQL'
\set o random(1, :offers)
UPDATE offerprice SET merchant_price = random() * 100 WHERE offer_id = :o AND currency = 'USD';
SQL
cat >"$WORK/managed.sql" <<'SQL'
\set o random(1, :offers)
UPDATE offerprice SET price = price + 0.01 WHERE offer_id = :o AND currency = 'EUR';
SQL
declare -A TPS=()
pgbench_tps() {
    local script=$1 out
    out=$("$PGBIN/pgbench" -n -h 127.0.0.1 -p "${PORT[guarded]}" -U merchant -c "$CLIENTS" -j "$CLIENTS" \
        -T "$SECONDS_EACH" -D offers="$OFFERS" -f "$WORK/$script.sql" shop 2>&1) \
        || { echo "$out" >&2; die "pgbench $script failed"; }
    sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out"
}
MODES=(off record refuse)
for round in $(seq 1 "$ROUNDS"); do
    order=("${MODES[@]}")
    (( round % 2 == 0 )) && order=(refuse record off)
    for g in "${order[@]}"; do
        init_as guarded "$g"
        q guarded -c "CHECKPOINT"
        t=$(pgbench_tps own)
        TPS[own.$g]="${TPS[own.$g]:-} $t"
        if [[ $g != refuse ]]; then
            t=$(pgbench_tps managed)
            TPS[managed.$g]="${TPS[managed.$g]:-} $t"
        fi
        log "round $round: guard $g: own column ${TPS[own.$g]##* } tps${TPS[managed.$g]:+, managed column ${TPS[managed.$g]##* } tps}"
    done
done
edits=$(q guarded -c "SELECT count(*) FROM stagingprop.production_edits")
q guarded -c "TRUNCATE stagingprop.production_edits"
# Put the managed prices back as staging has them, as sync's comparison needs.
q staging -c "\\copy (SELECT offer_id, currency, price FROM offerprice) TO STDOUT" \
    | q guarded -c "CREATE TEMP TABLE p (offer_id bigint, currency char(3), price numeric(20,5))" \
        -c "\\copy p FROM STDIN" \
        -c "SET session_replication_role = replica" \
        -c "UPDATE offerprice o SET price = p.price FROM p WHERE (o.offer_id, o.currency) = (p.offer_id, p.currency) AND o.price <> p.price"
init_as guarded record

# --- 2. sync's catch-up -----------------------------------------------------------------------
declare -A SECONDS_OF=([plain]=0 [guarded]=0)
run_sync() {
    local name=$1 round=$2 config=$3 t0 t1 rc=0 s
    q staging -c "CHECKPOINT"
    q "$name" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    t0=$(now)
    "$BIN" --config "$config" sync --until-caught-up >"$WORK/report.$name.$round.txt" 2>"$WORK/sync.$name.$round.log" || rc=$?
    t1=$(now)
    if (( rc != 0 )); then
        tail -n 30 "$WORK/sync.$name.$round.log" >&2
        die "stagingprop sync to $name failed (exit $rc)"
    fi
    s=$(elapsed "$t0" "$t1")
    SECONDS_OF[$name]=$(awk -v a="${SECONDS_OF[$name]}" -v b="$s" 'BEGIN { print a + b }')
    log "round $round: $name caught up in $s s"
}
ROWS=0
for round in $(seq 1 "$ROUNDS"); do
    before=$(rows_written)
    oltp_backlog "$WORK/pgbench.$round.log"
    q staging -c "INSERT INTO bench_marker VALUES ($round, now())"
    rows=$(( $(rows_written) - before ))
    ROWS=$(( ROWS + rows ))
    log "round $round: staging committed $BACKLOG_TXNS transactions changing $rows rows"
    if (( round % 2 == 1 )); then
        run_sync plain "$round" "$WORK/plain.off.toml"; run_sync guarded "$round" "$WORK/guarded.record.toml"
    else
        run_sync guarded "$round" "$WORK/guarded.record.toml"; run_sync plain "$round" "$WORK/plain.off.toml"
    fi
done

FAILED=0
# merchant_price is production's: compare staging's columns only.
for t in "${TABLES[@]}"; do
    cols='x::text'
    [[ $t == offerprice ]] && cols="(x.offer_id, x.currency, x.price)::text"
    s=$(q staging -c "SELECT count(*) || '/' || coalesce(md5(string_agg($cols, '|' ORDER BY ${ORDER_BY[$t]})), '-') FROM $t x")
    for c in plain guarded; do
        v=$(q "$c" -c "SELECT count(*) || '/' || coalesce(md5(string_agg($cols, '|' ORDER BY ${ORDER_BY[$t]})), '-') FROM $t x")
        [[ $v == "$s" ]] || { log "$c: $t MISMATCH (staging $s, $c $v)"; FAILED=1; }
    done
done
(( FAILED == 0 )) || die "a target differs from staging"
log "both targets MATCH staging"

{
    echo
    echo "stagingprop guard cost, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version')"
    echo "production's own writes: $ROUNDS rounds of ${SECONDS_EACH} s per mode, $CLIENTS clients, median tps ($edits edits recorded)"
    printf '%-28s %10s %10s %10s\n' update off record refuse
    for w in own managed; do
        off=$(median "${TPS[$w.off]}")
        rec=$(median "${TPS[$w.record]}")
        ref=$( [[ $w == own ]] && median "${TPS[$w.refuse]}" || echo refused)
        label=$( [[ $w == own ]] && echo "production's own column" || echo "managed column" )
        printf '%-28s %10s %10s %10s\n' "$label" "$off" "$rec" "$ref"
        awk -v o="$off" -v r="$rec" -v l="$label" 'BEGIN { printf "  %s: record costs %.1f%% (target: at most 10%%)\n", l, (1 - r / o) * 100 }'
        [[ $w == own ]] && awk -v o="$off" -v r="$ref" 'BEGIN { printf "  production'"'"'s own column: refuse costs %.1f%% (target: at most 10%%)\n", (1 - r / o) * 100 }'
    done
    echo "sync catch-up: $ROUNDS rounds of $BACKLOG_TXNS OLTP transactions, $ROWS rows"
    printf '%-8s %10s %12s\n' target seconds rows/s
    for c in plain guarded; do
        printf '%-8s %10.2f %12.0f\n' "$c" "${SECONDS_OF[$c]}" "$(awk -v r="$ROWS" -v t="${SECONDS_OF[$c]}" 'BEGIN { print r / t }')"
    done
    awk -v a="${SECONDS_OF[plain]}" -v b="${SECONDS_OF[guarded]}" \
        'BEGIN { printf "guarded rows/s = %.2f x plain rows/s (cost of the guard: %.1f%%; target: at most 10%%)\n", a / b, (1 - a / b) * 100 }'
}
