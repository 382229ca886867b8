#!/usr/bin/env bash
# End-to-end benchmark: what key remapping costs `sync`. The same staging backlog is applied by
# stagingprop to two targets holding the same seed: "ident", where every table keeps its keys,
# and "remap", where catentry is remap-on-conflict (production made rows of its own under a
# quarter of the keys staging's new products take, so those products, their descriptions,
# offers and prices move to production's sequence) and offer is allocate (every offer gets a
# production key; the seed's offers are mapped to themselves, as after `stagingprop copy`).
#
#   benches/e2e_remap.sh                       # from the repository root
#   BACKLOG_TXNS=5000 PRODUCTS=20000 benches/e2e_remap.sh   # a quicker, smaller run
#
# Each round commits BACKLOG_TXNS pgbench OLTP transactions (the workload of e2e_sync.sh) while
# sync is stopped, then times `sync --until-caught-up` on each target, one after the other; the
# order alternates between rounds. The result is the rows/s of both and the cost of remapping
# (1 - remap rows/s / ident rows/s). Afterwards both targets are compared with staging: ident
# row by row, remap through its key map (copied to staging), production-born rows aside; and the
# key map must hold exactly one entry per remapped row. A mismatch fails the run (exit 1).
#
# Knobs (environment): PRODUCTS=50000, BACKLOG_TXNS=20000 (per round), ROUNDS=2, CLIENTS=2,
# PG_EXTRA_CONF, KEEP=1, STAGINGPROP_PG_BIN, CARGO_TARGET_DIR (as in e2e_sync.sh).
set -euo pipefail

PRODUCTS=${PRODUCTS:-50000}
BACKLOG_TXNS=${BACKLOG_TXNS:-20000}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-2}
BIG_ROWS=0
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-remap.XXXXXX")
chmod 755 "$WORK"
trap 'rc=$?; set +e; stop_clusters; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=benches/catalogue.sh
source "$REPO/benches/catalogue.sh"

# New products take keys from staging's newprod_seq (10000001 up): production owns every
# fourth of them already.
FIRST_NEW=10000001
LAST_NEW=$(( FIRST_NEW + ROUNDS * BACKLOG_TXNS ))
BORN="catentry_id >= $FIRST_NEW AND (catentry_id - $FIRST_NEW) % 4 = 0 AND catentry_id <= $LAST_NEW"

write_config() {
    local name=$1 rules=$2
    SP_RULES=()
    if [[ $rules == 1 ]]; then
        SP_RULES[catentry]='key = { rule = "remap-on-conflict", sequence = "public.prodcat_seq" }'
        SP_RULES[offer]='key = { rule = "allocate", sequence = "public.prodoffer_seq" }'
    fi
    write_sp_config "$WORK/$name.toml" "$name" "sp_$name" "${TABLES[@]}"
}

# run_sync NAME ROUND: times `sync --until-caught-up`; adds to SECONDS_OF[NAME].
declare -A SECONDS_OF=([ident]=0 [remap]=0)
run_sync() {
    local name=$1 round=$2 t0 t1 rc=0
    q staging -c "CHECKPOINT"
    q "$name" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    t0=$(now)
    "$BIN" --config "$WORK/$name.toml" sync --until-caught-up >"$WORK/report.$name.$round.txt" 2>"$WORK/sync.$name.$round.log" || rc=$?
    t1=$(now)
    if (( rc != 0 )); then
        tail -n 30 "$WORK/sync.$name.$round.log" >&2
        die "stagingprop sync to $name failed (exit $rc)"
    fi
    local s
    s=$(elapsed "$t0" "$t1")
    SECONDS_OF[$name]=$(awk -v a="${SECONDS_OF[$name]}" -v b="$s" 'BEGIN { print a + b }')
    log "round $round: $name caught up in $s s"
}

log "work directory $WORK; PostgreSQL binaries $PGBIN"
log "loading $PRODUCTS products into all three"
start_with_seed staging ident remap
q remap -c "CREATE SEQUENCE prodcat_seq START 900000000; CREATE SEQUENCE prodoffer_seq START 900000000;" \
    -c "INSERT INTO catentry SELECT catentry_id, 'PRODBORN-' || catentry_id, 1, 1, 1, now(), 'production-born', '{}'
          FROM generate_series($FIRST_NEW, $LAST_NEW) catentry_id WHERE $BORN"

write_config ident 0
write_config remap 1
for c in ident remap; do
    "$BIN" --config "$WORK/$c.toml" init >"$WORK/init.$c.log" 2>&1 || { cat "$WORK/init.$c.log" >&2; die "init ($c) failed"; }
done
# The seed's offers keep their keys: mapped to themselves, as a copy records them.
q remap -c "INSERT INTO stagingprop.key_map (table_name, source_key, target_key)
            SELECT 'public.offer', offer_id, offer_id FROM offer"

ROWS=0
for round in $(seq 1 "$ROUNDS"); do
    before=$(rows_written)
    oltp_backlog "$WORK/pgbench.$round.log"
    q staging -c "INSERT INTO bench_marker VALUES ($round, now())"
    rows=$(( $(rows_written) - before ))
    ROWS=$(( ROWS + rows ))
    log "round $round: staging committed $BACKLOG_TXNS transactions changing $rows rows"
    if (( round % 2 == 1 )); then
        run_sync ident "$round"; run_sync remap "$round"
    else
        run_sync remap "$round"; run_sync ident "$round"
    fi
done

# --- verification -----------------------------------------------------------------------------
FAILED=0
s=$(fingerprint staging)
i=$(fingerprint ident)
if [[ $i == "$s" ]]; then log "ident target MATCH"; else log "ident target MISMATCH: staging $s / ident $i"; FAILED=1; fi

q staging -c "SET client_min_messages = warning" -c "DROP TABLE IF EXISTS km" -c "CREATE TABLE km (t text, s bigint, g bigint, PRIMARY KEY (t, s))"
q remap -c "\\copy (SELECT table_name, source_key, target_key FROM stagingprop.key_map) TO STDOUT" \
    | q staging -c "\\copy km FROM STDIN"
translated() { echo "coalesce((SELECT g FROM km WHERE t = 'public.$2' AND s = x.$1), x.$1)"; }
declare -A TRANSLATE=(
    [catentry]="jsonb_build_object('catentry_id', $(translated catentry_id catentry))"
    [catentdesc]="jsonb_build_object('catentry_id', $(translated catentry_id catentry))"
    [offer]="jsonb_build_object('offer_id', $(translated offer_id offer), 'catentry_id', $(translated catentry_id catentry))"
    [offerprice]="jsonb_build_object('offer_id', $(translated offer_id offer))"
    [bench_marker]="'{}'::jsonb"
)
for t in "${TABLES[@]}"; do
    born=false
    [[ $t == catentry ]] && born="partnumber LIKE 'PRODBORN-%'"
    a=$(q staging -c "SELECT count(*) || '/' || coalesce(md5(string_agg(j, '|' ORDER BY j)), '-')
                        FROM (SELECT (to_jsonb(x) || ${TRANSLATE[$t]})::text AS j FROM $t x) y")
    b=$(q remap -c "SELECT count(*) || '/' || coalesce(md5(string_agg(j, '|' ORDER BY j)), '-')
                      FROM (SELECT to_jsonb(x)::text AS j FROM $t x WHERE ($born) IS NOT TRUE) y")
    if [[ $a == "$b" ]]; then log "remap target $t MATCH through the key map ($a)"
    else log "remap target $t MISMATCH: staging (translated) $a / remap $b"; FAILED=1; fi
done
counts=$(q staging -c "SELECT (SELECT count(*) FROM km WHERE t = 'public.offer') || ' ' || (SELECT count(*) FROM offer)
                        || ' ' || (SELECT count(*) FROM km WHERE t = 'public.catentry') || ' ' ||
                        (SELECT count(*) FROM catentry WHERE $BORN)")
read -r map_offers offers map_entries born_keys <<<"$counts"
if [[ $map_offers == "$offers" && $map_entries == "$born_keys" ]]; then
    log "key map: $map_offers offer entries for $offers offers, $map_entries catentry entries for $born_keys colliding products"
else
    log "key map MISMATCH: $map_offers offer entries for $offers offers, $map_entries catentry entries for $born_keys colliding products"
    FAILED=1
fi
(( FAILED == 0 )) || die "a target differs from staging"

{
    echo
    echo "stagingprop remapping cost, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version')"
    echo "$ROUNDS rounds of $BACKLOG_TXNS OLTP transactions, $ROWS rows; $map_entries catentry keys remapped, $map_offers offers allocated"
    printf '%-8s %10s %12s\n' target seconds rows/s
    for c in ident remap; do
        printf '%-8s %10.2f %12.0f\n' "$c" "${SECONDS_OF[$c]}" "$(awk -v r="$ROWS" -v t="${SECONDS_OF[$c]}" 'BEGIN { print r / t }')"
    done
    awk -v a="${SECONDS_OF[ident]}" -v b="${SECONDS_OF[remap]}" \
        'BEGIN { printf "remap rows/s = %.2f x ident rows/s (cost of remapping: %.1f%%; target: at most 15%%)\n", a / b, (1 - a / b) * 100 }'
}
