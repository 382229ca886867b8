#!/usr/bin/env bash
# Bulk-copy benchmark: `stagingprop copy` against a raw `psql COPY | psql COPY` pipe, PostgreSQL's
# own subscription initial sync and (when installed) `pgcopydb copy table-data`, on the same
# source data in the same run.
#
#   benches/e2e_copy.sh                     # from the repository root, ~1 GB of data
#   SCALE_MB=200 benches/e2e_copy.sh        # a quicker run
#
# It builds the release binary, starts two throwaway PostgreSQL clusters on free loopback ports
# (the source, wal_level = logical, configured as [production]; the target, configured as
# [staging]), loads about SCALE_MB MB of catalogue-shaped data into the source and measures, one
# after the other (never concurrently), each method copying the five tables into a freshly
# recreated, empty target database with the same schema:
#
#   catentry    (products; parent)                       } linked by a foreign key:
#   catentdesc  (2 per product, TOASTed long text)       } stagingprop loads them in one transaction
#   attrval     (4 per product, jsonb)                   standalone
#   attachment  (1 per 4 products, 8 KB bytea, TOASTed)  standalone
#   offerprice  (4 per product, numeric)                 standalone
#
#   1. stagingprop copy --from production --to staging --jobs $JOBS  (wall time of the command,
#      start-up, schema checks and its per-table ANALYZE included)
#   2. raw pipe: per table `psql -c "COPY t TO STDOUT" | psql -c "COPY t FROM STDIN"` (text
#      format), $JOBS tables at a time (xargs -P), largest first; the target sessions run with
#      session_replication_role = replica (as stagingprop's do), so the order does not matter
#      for the foreign key. Not one consistent snapshot (each table is read in its own).
#   2b. binary pipe: the same with COPY ... (FORMAT binary): the pipe at its best, the ingestion
#      limit of this machine for a copy that reads and writes whole tables.
#   3. native initial sync: CREATE SUBSCRIPTION ... WITH (copy_data = true) on the target of a
#      publication of the five tables on the source, timed until every pg_subscription_rel
#      state is 'r' or 's' (polled every 50 ms server-side). PostgreSQL 15 runs at most
#      max_sync_workers_per_subscription (default 2) table-sync workers, in text COPY format.
#   4. pgcopydb copy table-data --table-jobs $JOBS, when the pgcopydb binary is present (the
#      script tries `apt-get install -y pgcopydb` when run as root; otherwise that column is
#      skipped). pgcopydb truncates each target table before loading it, which PostgreSQL
#      refuses for a table referenced by a foreign key: its target gets the foreign key after
#      the data (that ALTER TABLE is timed separately, not included).
#
# Between phases: the target database is dropped and recreated, VACUUM ANALYZE + CHECKPOINT on
# both clusters. After each phase the target is compared with the source table by table
# (count + md5 of the per-row md5s of t::text in key order: md5(string_agg(t::text)) would
# exceed the 1 GB text limit at this scale) -> MATCH / MISMATCH; a mismatch fails the run
# (exit 1). The CPU seconds of each cluster's server processes (from the postmaster's own and
# reaped-children times in /proc) and of the client processes (/usr/bin/time) are printed per
# phase, and the per-table seconds of stagingprop and the pipe.
#
# Knobs (environment):
#   SCALE_MB=1000       approximate size of the source data (heap + TOAST, without indexes)
#   JOBS=2              parallel workers for every method (stagingprop --jobs, xargs -P,
#                       pgcopydb --table-jobs; the native sync has its own default of 2)
#   SPLIT_MB=256        stagingprop --split-mb: tables at least this large are copied in block
#                       ranges by all workers
#   MAX_PREPARED=0      max_prepared_transactions of both clusters (PostgreSQL's default: 0)
#   LINKED=0            1: attrval and attachment get foreign keys to catentry as well (one linked
#                       group with ~90 % of the data)
#   ATOMIC=0            1: stagingprop copy --atomic (each FK-linked group visible at once; its
#                       ranges are prepared and committed together when MAX_PREPARED >= JOBS)
#   PHASES='stagingprop pipe binpipe native pgcopydb'   which phases run, in that order
#   WAIT_FOR=e2e_sync.sh   before measuring, wait while a process matching this runs (pgrep -f;
#                       empty: do not wait), so that two benchmarks never share the cores
#   ROUNDS=3            measure every phase this many times; even rounds run in reverse order;
#                       the report gives each method's speedup per round, median and spread
#   WARMUP=1            one untimed raw pipe load into the target first (creates its WAL
#                       segments: otherwise whichever method runs first pays for that)
#   PG_EXTRA_CONF=''    extra postgresql.conf lines for both clusters (';'-separated)
#   KEEP=1              keep the work directory (server logs, stagingprop log) at exit
#   STAGINGPROP_PG_BIN  directory of initdb/pg_ctl/psql (default: newest /usr/lib/postgresql/*/bin)
#   CARGO_TARGET_DIR    as for cargo
set -euo pipefail

SCALE_MB=${SCALE_MB:-1000}
JOBS=${JOBS:-2}
SPLIT_MB=${SPLIT_MB:-256}
MAX_PREPARED=${MAX_PREPARED:-0}
ATOMIC=${ATOMIC:-0}
LINKED=${LINKED:-0}
PHASES=${PHASES:-stagingprop pipe binpipe native pgcopydb}
WAIT_FOR=${WAIT_FOR-e2e_sync.sh}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
KEEP=${KEEP:-0}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is needed for the CPU figures"
(( SCALE_MB >= 10 )) || die "SCALE_MB must be >= 10"

build_stagingprop

PGCOPYDB_NOTE=''
if [[ " $PHASES " == *" pgcopydb "* ]] && ! command -v pgcopydb >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "pgcopydb not found; trying apt-get install -y pgcopydb"
        apt-get install -y pgcopydb >/dev/null 2>&1 || true
    fi
    if ! command -v pgcopydb >/dev/null; then
        PGCOPYDB_NOTE="pgcopydb is not installed and could not be installed (apt-get install -y pgcopydb): column skipped"
        log "$PGCOPYDB_NOTE"
    fi
fi
HAVE_PGCOPYDB=0
command -v pgcopydb >/dev/null && HAVE_PGCOPYDB=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-copy.XXXXXX")
chmod 755 "$WORK"

cleanup() {
    local rc=$?
    set +e
    stop_clusters
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Schema and data. About 9.1 KB of heap + TOAST per product: catentdesc 2 x 2.6 KB, attrval
# 4 x ~0.35 KB, attachment 8 KB per 4 products, offerprice 4 x ~75 B, catentry ~0.2 KB.
PRODUCTS=$(( SCALE_MB * 1000000 / 9100 ))
TABLES=(catentry catentdesc attrval attachment offerprice)
declare -A ORDER_BY=([catentry]=catentry_id [catentdesc]="catentry_id, language_id" [attrval]=attrval_id
                     [attachment]=attachment_id [offerprice]="offer_id, currency")

SCHEMA_SQL="
CREATE TABLE catentry (
    catentry_id bigint PRIMARY KEY,
    partnumber varchar(64) NOT NULL UNIQUE,
    member_id bigint NOT NULL,
    buyable int,
    published int,
    markfordelete int NOT NULL DEFAULT 0,
    lastupdate timestamptz,
    field1 varchar(254));
CREATE TABLE catentdesc (
    catentry_id bigint NOT NULL,
    language_id int NOT NULL,
    name varchar(128),
    shortdescription varchar(254),
    longdescription text,
    published int,
    PRIMARY KEY (catentry_id, language_id));
CREATE TABLE attrval (
    attrval_id bigint PRIMARY KEY,
    catentry_id bigint NOT NULL,
    attribute_id int NOT NULL,
    identifier varchar(64),
    value jsonb);
CREATE TABLE attachment (
    attachment_id bigint PRIMARY KEY,
    catentry_id bigint NOT NULL,
    mimetype varchar(64),
    filename varchar(254),
    content bytea);
CREATE TABLE offerprice (
    offer_id bigint NOT NULL,
    currency char(3) NOT NULL,
    price numeric(20,5) NOT NULL,
    minimumquantity numeric(25,5),
    lastupdate timestamptz,
    PRIMARY KEY (offer_id, currency));
"
FK_SQL="ALTER TABLE catentdesc ADD CONSTRAINT catentdesc_catentry_fk FOREIGN KEY (catentry_id) REFERENCES catentry"
# LINKED=1: attrval and attachment refer to catentry too, so one group of linked tables holds
# about 90 % of the data (a catalogue where most tables hang off catentry).
if (( LINKED )); then
    FK_SQL+=";
ALTER TABLE attrval ADD CONSTRAINT attrval_catentry_fk FOREIGN KEY (catentry_id) REFERENCES catentry;
ALTER TABLE attachment ADD CONSTRAINT attachment_catentry_fk FOREIGN KEY (catentry_id) REFERENCES catentry"
fi

# A pool of 640 KB of random bytes; attachments are slices of it, long texts hex-encoded slices
# (byte offsets: substr on text would walk the UTF-8 characters), so they neither compress
# (pglz) nor cost one md5 per 32 bytes to generate.
POOL_CTE="WITH pool AS MATERIALIZED (SELECT decode(string_agg(md5(random()::text), ''), 'hex') AS p FROM generate_series(1, 40000))"
LOAD_PARENTS_SQL="
INSERT INTO catentry
SELECT i, 'PN-' || lpad(i::text, 9, '0'), 7000000000000000001 + i % 3, 1, 1, 0,
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second', 'field1 ' || md5(i::text)
  FROM generate_series(1, $PRODUCTS) i;
$POOL_CTE
INSERT INTO catentdesc
SELECT i, l, 'Product ' || i || ' (' || l || ')', 'Short description of product ' || i,
       encode(substr(pool.p, 1 + (i * 7919 + (l + 3) * 104729) % 600000, 1280), 'hex'), 1
  FROM pool, generate_series(1, $PRODUCTS) i, (VALUES (-1), (-2)) v(l);
"
LOAD_OTHERS_SQL="
INSERT INTO attrval
SELECT 4 * i + a, i, a, 'ATTR' || a || '-' || i,
       jsonb_build_object('color', (ARRAY['red', 'green', 'blue'])[1 + i % 3], 'size', i % 50,
                          'weight', round((i % 997) / 7.0, 3), 'active', i % 5 <> 0,
                          'tags', jsonb_build_array('a' || i % 7, 'b' || i % 11, 'c' || a),
                          'note', md5(i::text || a::text) || md5(a::text || i::text) || md5((i + a)::text))
  FROM generate_series(1, $PRODUCTS) i, generate_series(0, 3) a;
$POOL_CTE
INSERT INTO attachment
SELECT i, 4 * i, 'application/octet-stream', '/attachments/' || i || '.bin',
       substr(pool.p, 1 + (i * 7919) % 600000, 8192)
  FROM pool, generate_series(1, $PRODUCTS / 4) i;
INSERT INTO offerprice
SELECT o, (ARRAY['USD', 'EUR', 'GBP', 'JPY'])[k], ((o * 37 + k * 101) % 100000) / 100.0 + 0.5,
       1 + o % 3, timestamptz '2024-06-01 00:00:00+00' + o * interval '1 second'
  FROM generate_series(1, $PRODUCTS) o, generate_series(1, 4) k;
"

# Per table "count/md5"; one line "table:fingerprint ..." per database.
fingerprint() {
    local name=$1 t out=''
    for t in "${TABLES[@]}"; do
        out+="$t:$(q "$name" -c "SELECT count(*) || '/' || coalesce(md5(string_agg(md5(x::text), '' ORDER BY ${ORDER_BY[$t]})), '-') FROM $t x") "
    done
    echo "$out"
}

settle() {
    local c
    for c in "${CLUSTERS[@]}"; do
        q "$c" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    done
}

# An empty target database with the source's schema (foreign key added unless $1 = nofk).
fresh_target() {
    qpg target -c "DROP DATABASE IF EXISTS shop WITH (FORCE)" -c "CREATE DATABASE shop"
    if [[ ${1:-} == nofk ]]; then
        q target -c "$SCHEMA_SQL"
    else
        q target -c "$SCHEMA_SQL" -c "$FK_SQL"
    fi
}

# CPU ticks of a cluster's server processes: the postmaster's own and reaped children's times
# (backends that have exited) plus those of its live children.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
cluster_ticks() {
    local pm child total f
    pm=$(head -n 1 "$WORK/$1/data/postmaster.pid")
    read -r -a f <"/proc/$pm/stat"
    total=$(( f[13] + f[14] + f[15] + f[16] ))
    for child in $(pgrep -P "$pm"); do
        { read -r -a f <"/proc/$child/stat"; } 2>/dev/null || continue
        total=$(( total + f[13] + f[14] + f[15] + f[16] ))
    done
    echo "$total"
}
ticks_to_s() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", t / hz }'; }

# ---------------------------------------------------------------------------------------------
# The methods. Each sets SECONDS_TAKEN and CLIENT_CPU (user + system seconds of the client
# processes it started).
write_config() {
    # The source is configured as [production], the target as [staging] (copy --from production).
    SP_STAGING=target write_sp_config "$WORK/stagingprop.toml" source stagingprop "${TABLES[@]}"
}

client_cpu() { awk '{ printf "%.1f", $2 + $3 }' "$1"; }
client_wall() { awk '{ print $1 }' "$1"; }

run_stagingprop() {
    local rc=0
    /usr/bin/time -f '%e %U %S %M' -o "$WORK/time.stagingprop" \
        "$BIN" --config "$WORK/stagingprop.toml" copy --from production --to staging --jobs "$JOBS" --split-mb "$SPLIT_MB" \
        $( (( ATOMIC )) && echo --atomic ) >"$WORK/stagingprop.log" 2>&1 || rc=$?
    if (( rc != 0 )); then
        tail -n 30 "$WORK/stagingprop.log" >&2
        die "stagingprop copy failed (exit $rc)"
    fi
    SECONDS_TAKEN=$(client_wall "$WORK/time.stagingprop")
    CLIENT_CPU=$(client_cpu "$WORK/time.stagingprop")
    SP_RSS_MB=$(awk '{ printf "%.1f", $4 / 1024 }' "$WORK/time.stagingprop")
    # Per-table lines: "... copied worker=.. table=.. rows=.. mb=.. seconds=.."
    TABLE_TIMES[stagingprop]=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/stagingprop.log" | grep ' copied' |
        sed -E 's/.*worker=([0-9]+).*table=([^ ]+).*seconds="?([0-9.]+)"?.*/\2 \3s (worker \1)/' | tr '\n' ',' | sed 's/,$//; s/,/, /g')
}

# After stagingprop's copy, while the target equals the source: the time `stagingprop verify`
# takes, against reading every table of both sides once (COPY TO /dev/null, one after another).
measure_verify() {
    local t0 t1 rc=0 c t
    t0=$(now)
    "$BIN" --config "$WORK/stagingprop.toml" verify >"$WORK/verify.log" 2>&1 || rc=$?
    t1=$(now)
    if (( rc != 0 )); then
        tail -n 30 "$WORK/verify.log" >&2
        die "stagingprop verify did not report a match (exit $rc)"
    fi
    VERIFY_S=$(elapsed "$t0" "$t1")
    t0=$(now)
    for c in source target; do
        for t in "${TABLES[@]}"; do
            q "$c" -c "COPY public.$t TO STDOUT" >/dev/null
        done
    done
    t1=$(now)
    READ_BOTH_S=$(elapsed "$t0" "$t1")
    log "verify: $VERIFY_S s (match); reading both sides once: $READ_BOTH_S s"
}

# copy_pipe NAME OPTIONS: per table `COPY t TO STDOUT OPTIONS | COPY t FROM STDIN OPTIONS`, $JOBS
# tables at a time, largest first; the target sessions with session_replication_role = replica
# (no foreign-key triggers, as stagingprop's sessions).
copy_pipe() {
    local name=$1 options=$2 src target
    src="$PGBIN/psql -X -q -h 127.0.0.1 -p ${PORT[source]} -U postgres -d shop"
    target="$PGBIN/psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p ${PORT[target]} -U postgres -d shop"
    cat >"$WORK/pipe_one.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
t0=\$(date +%s.%N)
$src -c "COPY \$1 TO STDOUT $options" | PGOPTIONS='-c session_replication_role=replica' $target -c "COPY \$1 FROM STDIN $options"
t1=\$(date +%s.%N)
awk -v t="\$1" -v a="\$t0" -v b="\$t1" 'BEGIN { printf "%s %.1fs\n", t, b - a }' >>"$WORK/pipe.times"
EOF
    chmod +x "$WORK/pipe_one.sh"
    rm -f "$WORK/pipe.times"
    # Largest tables first, as stagingprop orders its groups.
    q source -c "SELECT relname FROM pg_class WHERE relname IN ($(printf "'%s'," "${TABLES[@]}" | sed 's/,$//'))
                 AND relkind = 'r' ORDER BY pg_table_size(oid) DESC" >"$WORK/pipe.order"
    /usr/bin/time -f '%e %U %S' -o "$WORK/time.pipe" \
        xargs -P "$JOBS" -n 1 "$WORK/pipe_one.sh" <"$WORK/pipe.order" || die "the raw COPY pipe failed"
    SECONDS_TAKEN=$(client_wall "$WORK/time.pipe")
    CLIENT_CPU=$(client_cpu "$WORK/time.pipe")
    TABLE_TIMES[$name]=$(paste -sd, "$WORK/pipe.times" | sed 's/,/, /g')
}
run_pipe() { copy_pipe pipe ''; }
# The pipe at its best: binary COPY spares the types' text output and input functions.
run_binpipe() { copy_pipe binpipe '(FORMAT binary)'; }

# The launcher starts apply workers at most once per wal_retrieve_retry_interval (5 s): wait
# that long after the previous start, so that the timing does not include its back-off.
NATIVE_LAST_START=0
run_native() {
    local t0 t1 retry wait
    retry=$(q target -c "SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'")
    wait=$(awk -v last="$NATIVE_LAST_START" -v now="$(now)" -v r="$retry" 'BEGIN { w = last + r + 0.5 - now; print (w > 0 ? w : 0) }')
    sleep "$wait"
    t0=$(now)
    NATIVE_LAST_START=$t0
    /usr/bin/time -f '%e %U %S' -o "$WORK/time.native" \
        "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PORT[target]}" -U postgres -d shop \
        -c "CREATE SUBSCRIPTION bench_native
              CONNECTION 'host=127.0.0.1 port=${PORT[source]} dbname=shop user=postgres'
              PUBLICATION bench_pub WITH (copy_data = true)" \
        -c "DO \$\$
            DECLARE started timestamptz := clock_timestamp(); seen text[] := '{}'; r record;
            BEGIN
              LOOP
                FOR r IN SELECT c.relname FROM pg_subscription_rel sr JOIN pg_class c ON c.oid = sr.srrelid
                          WHERE sr.srsubstate IN ('r', 's') AND NOT c.relname = ANY (seen) LOOP
                  seen := seen || r.relname::text;
                  RAISE NOTICE 'native-table % %s', r.relname,
                      round(extract(epoch FROM clock_timestamp() - started)::numeric, 1);
                END LOOP;
                EXIT WHEN (SELECT count(*) FROM pg_subscription_rel) = ${#TABLES[@]}
                      AND NOT EXISTS (SELECT 1 FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's'));
                PERFORM pg_sleep(0.05);
              END LOOP;
            END \$\$" 2>"$WORK/native.log" || { cat "$WORK/native.log" >&2; die "the native initial sync failed"; }
    t1=$(now)
    SECONDS_TAKEN=$(elapsed "$t0" "$t1")
    CLIENT_CPU=$(client_cpu "$WORK/time.native")
    TABLE_TIMES[native]=$(sed -nE 's/.*native-table ([^ ]+) ([0-9.]+s).*/\1 done at \2/p' "$WORK/native.log" | paste -sd, | sed 's/,/, /g')
    # The subscription's slot and workers go before the target is dropped.
    q target -c "SET client_min_messages = warning" -c "DROP SUBSCRIPTION bench_native"
}

run_pgcopydb() {
    local rc=0 t0 t1
    rm -rf "$WORK/pgcopydb"
    /usr/bin/time -f '%e %U %S' -o "$WORK/time.pgcopydb" \
        pgcopydb copy table-data \
        --source "postgres://postgres@127.0.0.1:${PORT[source]}/shop" \
        --target "postgres://postgres@127.0.0.1:${PORT[target]}/shop" \
        --dir "$WORK/pgcopydb" --table-jobs "$JOBS" >"$WORK/pgcopydb.log" 2>&1 || rc=$?
    if (( rc != 0 )); then
        tail -n 30 "$WORK/pgcopydb.log" >&2
        die "pgcopydb copy table-data failed (exit $rc)"
    fi
    SECONDS_TAKEN=$(client_wall "$WORK/time.pgcopydb")
    CLIENT_CPU=$(client_cpu "$WORK/time.pgcopydb")
    TABLE_TIMES[pgcopydb]=''
    t0=$(now)
    q target -c "$FK_SQL"
    t1=$(now)
    PGCOPYDB_FK_SECONDS=$(elapsed "$t0" "$t1")
}

# ---------------------------------------------------------------------------------------------
log "work directory $WORK; PostgreSQL binaries $PGBIN"
for c in source target; do
    start_cluster "$c"
    qpg "$c" -c "CREATE DATABASE shop"
done
log "clusters: source :${PORT[source]} ([production]), target :${PORT[target]} ([staging])"

log "loading ~$SCALE_MB MB into the source: $PRODUCTS products, $(( PRODUCTS * 2 )) descriptions, $(( PRODUCTS * 4 )) attribute values, $(( PRODUCTS / 4 )) attachments, $(( PRODUCTS * 4 )) prices"
t0=$(now)
# The foreign keys come after the data: the two loads run side by side.
q source -c "$SCHEMA_SQL"
q source -c "$LOAD_PARENTS_SQL" &
p1=$!
q source -c "$LOAD_OTHERS_SQL" &
p2=$!
wait "$p1" || die "loading the source failed"
wait "$p2" || die "loading the source failed"
q source -c "$FK_SQL"
q source -c "CREATE PUBLICATION bench_pub FOR TABLE $(IFS=,; echo "${TABLES[*]}")"
log "loaded in $(elapsed "$t0" "$(now)") s"
settle

SIZES=$(q source -F ' ' -c "SELECT relname, pg_table_size(oid), pg_indexes_size(oid),
                                    coalesce(pg_total_relation_size(NULLIF(reltoastrelid, 0)), 0)
                             FROM pg_class WHERE relname IN ($(printf "'%s'," "${TABLES[@]}" | sed 's/,$//'))
                              AND relkind = 'r' ORDER BY 2 DESC")
DATA_BYTES=$(awk '{ s += $2 } END { print s }' <<<"$SIZES")
DATA_MB=$(awk -v b="$DATA_BYTES" 'BEGIN { printf "%.0f", b / 1e6 }')
while read -r rel tbl idx toast; do
    log "  $rel: $(awk -v b="$tbl" 'BEGIN { printf "%.0f", b / 1e6 }') MB heap+TOAST (TOAST $(awk -v b="$toast" 'BEGIN { printf "%.0f", b / 1e6 }') MB), indexes $(awk -v b="$idx" 'BEGIN { printf "%.0f", b / 1e6 }') MB"
done <<<"$SIZES"
log "source data: $DATA_MB MB (heap + TOAST, without indexes)"

write_config
SETTINGS_SQL="SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name) FROM pg_settings
             WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method', 'shared_buffers',
                            'max_wal_size', 'checkpoint_timeout', 'autovacuum', 'wal_level', 'work_mem',
                            'maintenance_work_mem', 'max_sync_workers_per_subscription', 'max_logical_replication_workers',
                            'max_prepared_transactions')"
SETTINGS=$(qpg source -c "$SETTINGS_SQL")
[[ $(qpg target -c "$SETTINGS_SQL") == "$SETTINGS" ]] || die "settings of the target differ from the source's"
log "settings on both clusters: $SETTINGS"

log "fingerprinting the source (also warms the OS cache)"
SOURCE_FP=$(fingerprint source)

if [[ -n $WAIT_FOR ]] && pgrep -f "$WAIT_FOR" >/dev/null; then
    log "waiting until no process matching '$WAIT_FOR' runs (another benchmark)"
    while pgrep -f "$WAIT_FOR" >/dev/null; do sleep 5; done
    log "done waiting"
fi

declare -A RESULT TABLE_TIMES PER_TABLE
FAILED=0
SP_RSS_MB='-'
VERIFY_S=''
READ_BOTH_S=''
PGCOPYDB_FK_SECONDS=''
ORDER=()
for phase in $PHASES; do
    case $phase in
        stagingprop|pipe|binpipe|native) ;;
        pgcopydb) if (( ! HAVE_PGCOPYDB )); then log "pgcopydb: skipped ($PGCOPYDB_NOTE)"; continue; fi ;;
        *) die "unknown phase $phase (PHASES takes stagingprop pipe binpipe native pgcopydb)" ;;
    esac
    ORDER+=("$phase")
done

# The first load into a fresh cluster also creates (zero-fills) every WAL segment it writes;
# later loads recycle them. Without this untimed load the first phase pays for it (seen: 30-80 %
# slower wall time in the same run, whichever method ran first).
if [[ $WARMUP == 1 ]]; then
    fresh_target
    settle
    log "warm-up: one untimed raw pipe load into the target (WAL segments, caches)"
    run_pipe
    log "warm-up: $SECONDS_TAKEN s"
fi

for (( round = 1; round <= ROUNDS; round++ )); do
    # Odd rounds in PHASES order, even rounds reversed.
    if (( round % 2 == 1 )); then
        phases=("${ORDER[@]}")
    else
        phases=()
        for (( i = ${#ORDER[@]} - 1; i >= 0; i-- )); do phases+=("${ORDER[$i]}"); done
    fi
    for phase in "${phases[@]}"; do
        if [[ $phase == pgcopydb ]]; then fresh_target nofk; else fresh_target; fi
        settle
        log "round $round, $phase: copying"
        s0=$(cluster_ticks source)
        g0=$(cluster_ticks target)
        "run_$phase"
        s1=$(cluster_ticks source)
        g1=$(cluster_ticks target)
        fp=$(fingerprint target)
        if [[ $fp == "$SOURCE_FP" ]]; then
            verdict=MATCH
        else
            verdict=MISMATCH
            FAILED=1
            log "  source: $SOURCE_FP"
            log "  target: $fp"
        fi
        RESULT[$phase]+="$SECONDS_TAKEN $CLIENT_CPU $(ticks_to_s $(( s1 - s0 ))) $(ticks_to_s $(( g1 - g0 ))) $verdict;"
        log "round $round, $phase: $SECONDS_TAKEN s, $verdict; CPU s: client $CLIENT_CPU, source server $(ticks_to_s $(( s1 - s0 ))), target server $(ticks_to_s $(( g1 - g0 )))"
        if [[ $phase == stagingprop && $round == 1 && $verdict == MATCH ]]; then
            measure_verify
        fi
        [[ -z ${TABLE_TIMES[$phase]:-} ]] || log "  per table: ${TABLE_TIMES[$phase]}"
        [[ -z ${TABLE_TIMES[$phase]:-} ]] || PER_TABLE[$phase]+="  round $round: ${TABLE_TIMES[$phase]}"$'\n'
    done
done

# ---------------------------------------------------------------------------------------------
label() {
    case $1 in
        stagingprop) echo "stagingprop copy --jobs $JOBS$( (( ATOMIC )) && echo " --atomic")" ;;
        pipe) echo "raw COPY pipe, $JOBS at a time" ;;
        binpipe) echo "binary COPY pipe, $JOBS at a time" ;;
        native) echo "native initial sync" ;;
        pgcopydb) echo "pgcopydb copy table-data" ;;
    esac
}
{
    echo
    echo "stagingprop e2e copy benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(qpg source -c 'SHOW server_version')"
    echo "data: $DATA_MB MB heap+TOAST in ${#TABLES[@]} tables ($PRODUCTS products); jobs=$JOBS; foreign keys: $( (( LINKED )) && echo "catentdesc, attrval, attachment -> catentry" || echo "catentdesc -> catentry")"
    echo "settings (both clusters): $SETTINGS"
    echo "raw pipe: text COPY (the default format); binary pipe: COPY ... (FORMAT binary); both: target sessions"
    echo "  with session_replication_role=replica (no foreign-key triggers), largest tables first"
    echo "native: the subscriber's table-sync workers (text COPY, a subscription's default), max_sync_workers_per_subscription as above"
    [[ -z $PGCOPYDB_NOTE ]] || echo "$PGCOPYDB_NOTE"
    [[ -z $PGCOPYDB_FK_SECONDS ]] || echo "pgcopydb: target without the foreign key during the load; adding it afterwards took $PGCOPYDB_FK_SECONDS s (not included)"
    echo "speedup = other method's seconds / stagingprop's seconds (> 1: stagingprop faster)"
    echo
    echo "rounds: $ROUNDS (odd rounds in the order ${ORDER[*]}, even rounds reversed); warm-up load: $WARMUP"
    echo "seconds = mean over the rounds (each round's in brackets); CPU = mean seconds per round"
    echo
    printf '%-30s %8s %-22s %7s | %7s %7s %7s | %8s | %s\n' method seconds "(rounds)" "MB/s" "client" source target speedup verify
    mean_of() { tr ';' '\n' <<<"${RESULT[$1]}" | awk -v f="$2" 'NF { s += $f; n++ } END { printf "%.2f", s / n }'; }
    sp_s=0
    [[ -z ${RESULT[stagingprop]:-} ]] || sp_s=$(mean_of stagingprop 1)
    for phase in "${ORDER[@]}"; do
        secs=$(mean_of "$phase" 1)
        each=$(tr ';' '\n' <<<"${RESULT[$phase]}" | awk 'NF { printf "%s%.1f", (n++ ? " " : ""), $1 }')
        verdict=$(tr ';' '\n' <<<"${RESULT[$phase]}" | awk 'NF { v[$5] = 1 } END { if ("MISMATCH" in v) print "MISMATCH"; else print "MATCH" }')
        speed='-'
        if [[ $phase != stagingprop && $sp_s != 0 ]]; then
            speed=$(awk -v o="$secs" -v s="$sp_s" 'BEGIN { printf "%.2fx", o / s }')
        fi
        printf '%-30s %8.1f %-22s %7.1f | %7s %7s %7s | %8s | %s\n' "$(label "$phase")" "$secs" "($each)" \
            "$(awk -v m="$DATA_MB" -v s="$secs" 'BEGIN { print m / s }')" "$(mean_of "$phase" 2)" \
            "$(mean_of "$phase" 3)" "$(mean_of "$phase" 4)" "$speed" "$verdict"
    done
    echo "(CPU seconds: client = the client processes (stagingprop / psql pipes / pgcopydb); source and"
    echo " target = all server processes of that cluster: backends, walsenders, sync workers, checkpointer)"
    echo "stagingprop peak RSS: $SP_RSS_MB MB"
    if [[ -n $VERIFY_S ]]; then
        awk -v v="$VERIFY_S" -v r="$READ_BOTH_S" 'BEGIN { printf "stagingprop verify: %.1f s (match) against %.1f s to read both sides once: %.2fx\n", v, r, v / r }'
    fi
    if [[ $sp_s != 0 ]]; then
        echo
        echo "speedup per round (other method's seconds / stagingprop's in the same round; > 1: stagingprop faster):"
        sp_each=$(tr ';' '\n' <<<"${RESULT[stagingprop]}" | awk 'NF { print $1 }')
        for other in pipe binpipe native pgcopydb; do
            [[ -n ${RESULT[$other]:-} ]] || continue
            values=$(paste -d' ' <(tr ';' '\n' <<<"${RESULT[$other]}" | awk 'NF { print $1 }') <(echo "$sp_each") |
                awk '{ printf "%.3f ", $1 / $2 }')
            want=''
            [[ $other == pipe || $other == binpipe ]] && want=1.0
            [[ $other == native ]] && want=1.2
            summary=$(spread "$values")
            awk -v m="${summary%% *}" -v w="$want" -v n="$(label "$other")" -v sm="$summary" \
                'BEGIN { printf "stagingprop vs %-28s %s", n ":", sm;
                         if (w != "") printf " (target >= %.1fx: %s)", w, (m >= w ? "met" : "NOT met"); printf "\n" }'
        done
    fi
    echo
    for phase in "${ORDER[@]}"; do
        [[ -z ${PER_TABLE[$phase]:-} ]] || printf 'per table, %s:\n%s' "$(label "$phase")" "${PER_TABLE[$phase]}"
    done
}
(( FAILED == 0 )) || die "a target differs from the source"
