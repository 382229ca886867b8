#!/usr/bin/env bash
# End-to-end benchmark: stagingprop `sync` against PostgreSQL's own logical replication
# (CREATE SUBSCRIPTION), in its default configuration and at its best for the machine, on the
# same workload, the same staging database and equal targets.
#
#   benches/e2e_sync.sh                      # from the repository root
#   BACKLOG_TXNS=5000 BIG_ROWS=200000 ROUNDS=3 benches/e2e_sync.sh   # a quicker, smaller run
#   SP_BASE_BIN=/path/to/older/stagingprop benches/e2e_sync.sh       # an older build beside this one
#
# It builds the release binary, starts throwaway PostgreSQL clusters on free loopback ports
# (staging; "prod", the target of stagingprop; "native", the subscriber of a native subscription
# with PostgreSQL's defaults, streaming = off, binary = false; "best", the subscriber of a native
# subscription at its best: binary = true and streaming = on (PostgreSQL 14-15) or parallel
# (16+); "base", the target of SP_BASE_BIN when given), loads the same catalogue into all of them,
# and measures two scenarios, each for every applier, one after the other (never concurrently):
#
#   (a) backlog catch-up: the appliers are stopped (stagingprop not running, the subscriptions
#       disabled) while staging commits BACKLOG_TXNS small OLTP transactions (pgbench); then each
#       applier is started and timed until its target has the last of them.
#   (b) one big transaction: one staging transaction updating BIG_ROWS offerprice rows, then the
#       same catch-up timing.
#
# Each round makes a new backlog for (a) and a new big transaction for (b); there are ROUNDS
# rounds, and the order of the appliers alternates (odd rounds stagingprop first in (a) and last
# in (b), even rounds the reverse), so that no system always runs first or last. The report gives
# every round's figures and, per scenario, the median and the spread (min-max) of the ratios.
#
# "Caught up" is exact for all: after each workload, one more transaction inserts a marker row
# (bench_marker, a replicated table). All appliers apply in commit order, so the marker being
# visible on the target means everything before it is there. stagingprop is timed as the wall
# time of `sync --until-caught-up` (start-up included), which stops at staging's WAL position
# when it starts, i.e. after the marker. A native subscription is timed from
# `ALTER SUBSCRIPTION ... ENABLE` until the marker is visible on the subscriber (polled every
# 50 ms in one server-side loop, no client round trips).
#
# After every scenario the four catalogue tables (and the marker table) of every target are
# compared with staging (md5 of every row in key order); a mismatch fails the run (exit 1).
#
# The ceiling: more slots, created with the others, are drained after each scenario by
# pg_recvlogical into /dev/null up to the marker's position, with pgoutput protocol 1 (what
# the native subscription receives with its default streaming=off), with protocol 2 and
# streaming=on (in-progress transactions are sent while decoding instead of spilled to disk
# first; what stagingprop asks for), and with binary=true. No applier can catch up faster than
# staging's walsender sends; native seconds / ceiling seconds is the most any applier could beat
# native replication by here. (The ceiling runs with a consumer that does nothing, so on a
# machine where the walsender shares cores with the target it is generous.)
#
# Knobs (environment):
#   PRODUCTS=50000        catalogue size (2 descriptions, 2 offers per product)
#   BACKLOG_TXNS=30000    OLTP transactions in scenario (a)
#   CLIENTS=2             pgbench clients generating them (disjoint products, no lock waits)
#   BIG_ROWS=1000000      rows updated by the one transaction of scenario (b); offerprice gets
#                         enough currencies per offer to hold them
#   ROUNDS=3              rounds (each: a new backlog and a new big transaction, every applier)
#   PEERS='native best'   which native subscriptions run (default configuration, best settings)
#   SP_BASE_BIN=''        another stagingprop binary (an older version) run as one more applier,
#                         on its own target and slot, so a regression shows in the same run
#   NATIVE_SYNCHRONOUS_COMMIT=off   the subscriptions' synchronous_commit (PostgreSQL's default
#                         for subscriptions is off; stagingprop commits asynchronously too and confirms once flushed)
#   PG_EXTRA_CONF=''      extra postgresql.conf lines for all clusters (';'-separated)
#   SYNC_CONF=''          extra [sync] lines of stagingprop's config (';'-separated), e.g.
#                         SYNC_CONF='batch_max_delay_ms = 1000'
#   SCOPED=1              manage two tables in part (issue 15): catentdesc only language -1 and
#                         without longdescription, offerprice only odd offers (half the rows of
#                         both scenarios); the native subscriptions read the same publication,
#                         so they get the same row filters and column list. The targets are then
#                         compared with the native default's instead of with staging.
#   KEEP=1                keep the work directory (server logs, stagingprop logs) at exit
#   SP_WRAPPER=''         a command prefix for `stagingprop sync` (diagnosis), e.g.
#                         SP_WRAPPER="perf record -F 999 -g -o /tmp/sp.perf --"
#   SP_BIN                a stagingprop binary to use instead of building this checkout
#   STAGINGPROP_PG_BIN    directory of initdb/pg_ctl/psql/pgbench (default: newest
#                         /usr/lib/postgresql/*/bin, then pg_config --bindir, then PATH)
#   CARGO_TARGET_DIR      as for cargo
set -euo pipefail

PRODUCTS=${PRODUCTS:-50000}
BACKLOG_TXNS=${BACKLOG_TXNS:-30000}
CLIENTS=${CLIENTS:-2}
BIG_ROWS=${BIG_ROWS:-1000000}
ROUNDS=${ROUNDS:-3}
read -r -a PEERS <<<"${PEERS-native best}"
SP_BASE_BIN=${SP_BASE_BIN:-}
NATIVE_SYNCHRONOUS_COMMIT=${NATIVE_SYNCHRONOUS_COMMIT:-off}
PG_EXTRA_CONF=${PG_EXTRA_CONF:-}
SYNC_CONF=${SYNC_CONF:-}
KEEP=${KEEP:-0}
SCOPED=${SCOPED:-0}
read -r -a SP_WRAPPER <<<"${SP_WRAPPER:-}"

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench pg_recvlogical
(( BACKLOG_TXNS >= CLIENTS && PRODUCTS >= CLIENTS )) || die "BACKLOG_TXNS and PRODUCTS must be >= CLIENTS"
(( ROUNDS >= 1 )) || die "ROUNDS must be >= 1"
for p in "${PEERS[@]}"; do
    [[ $p == native || $p == best ]] || die "PEERS: unknown peer $p (native, best)"
done
if (( SCOPED )) && [[ " ${PEERS[*]} " != *" native "* ]]; then die "SCOPED=1 compares with the native default: keep native in PEERS"; fi

build_stagingprop
if [[ -n $SP_BASE_BIN ]]; then
    [[ -x $SP_BASE_BIN ]] || die "SP_BASE_BIN=$SP_BASE_BIN is not an executable"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-e2e.XXXXXX")
chmod 755 "$WORK"
SYNC_PID=''
WATCH_PID=''

cleanup() {
    local rc=$?
    set +e
    if [[ -n $SYNC_PID ]] && kill -0 "$SYNC_PID" 2>/dev/null; then
        kill "$SYNC_PID"
        wait "$SYNC_PID" 2>/dev/null
    fi
    touch "$WORK/stop"
    if [[ -n $WATCH_PID ]]; then wait "$WATCH_PID" 2>/dev/null; fi
    stop_clusters
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Schema, seed, OLTP script, rows_written and fingerprint.
# shellcheck source=benches/catalogue.sh
source "$REPO/benches/catalogue.sh"

# The appliers: stagingprop (this build, target "prod"), base (SP_BASE_BIN, target "base"), and
# the native subscriptions, each named after its subscriber cluster (subscription and slot
# bench_<name>).
APPLIERS=(stagingprop)
[[ -n $SP_BASE_BIN ]] && APPLIERS+=(base)
APPLIERS+=("${PEERS[@]}")
declare -A TARGET=([stagingprop]=prod [base]=base [native]=native [best]=best)
declare -A SLOT=([stagingprop]=stagingprop [base]=stagingprop_base [native]=bench_native [best]=bench_best)
declare -A SP_BINARY=([stagingprop]=$BIN [base]=$SP_BASE_BIN)
is_stagingprop() { [[ $1 == stagingprop || $1 == base ]]; }

FAILED=0
# Compares every target with staging (SCOPED: with the native default's target); sets VERDICT[applier].
declare -A VERDICT
verify() {
    local label=$1 reference who fp
    if (( SCOPED )); then
        # Scoped: every target holds staging's in-scope rows over the same seed, so they must agree.
        reference=$(fingerprint native)
    else
        reference=$(fingerprint staging)
    fi
    for who in "${APPLIERS[@]}"; do
        fp=$(fingerprint "${TARGET[$who]}")
        if [[ $fp == "$reference" ]]; then
            VERDICT[$who]=MATCH
        else
            VERDICT[$who]=MISMATCH
            FAILED=1
            log "$label: $who's target MISMATCH"
            log "  reference: $reference"
            log "  $who:  $fp"
        fi
    done
    log "$label: $(for who in "${APPLIERS[@]}"; do printf '%s %s; ' "$who" "${VERDICT[$who]}"; done)"
}

settle() {
    local c
    for c in staging "${APPLIERS[@]}"; do
        [[ $c == staging ]] || c=${TARGET[$c]}
        q "$c" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    done
    # A slot's restart_lsn moves only when its consumer confirms a position after the walsender
    # decoded a running-transactions record, so where it stands depends on how the consumer's
    # last run ended: one slot may have to decode the previous scenario's WAL again (hundreds of
    # MB after a big transaction), another not. Every slot is brought as far as its confirmed
    # position allows (decoding up to it, untimed; what it confirmed stays), so each applier
    # starts from the same place.
    q staging -c "SELECT count(pg_replication_slot_advance(slot_name, confirmed_flush_lsn))
                    FROM pg_replication_slots WHERE slot_type = 'logical' AND NOT active" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Appliers
write_configs() {
    SP_RULES=()
    if (( SCOPED )); then
        SP_RULES[catentdesc]=$(printf '%s\n' 'filter = "language_id = -1"' 'exclude_columns = ["longdescription"]')
        SP_RULES[offerprice]='filter = "offer_id % 2 = 1"'
    fi
    local who
    for who in "${APPLIERS[@]}"; do
        is_stagingprop "$who" || continue
        SP_SYNC=$SYNC_CONF write_sp_config "$WORK/$who.toml" "${TARGET[$who]}" "${SLOT[$who]}" "${TABLES[@]}"
    done
}

HAVE_TIME=0
[[ -x /usr/bin/time ]] && /usr/bin/time -f '%M' true 2>/dev/null && HAVE_TIME=1

# CPU time of the server processes doing the work, read from /proc while an applier runs (the
# machine may be shared, so wall time alone is noisy): the applying backends on the target
# (stagingprop's production sessions, or the native apply workers, parallel ones included) and
# the walsender decoding the slot on staging. Sampled every 50 ms; the applying processes are
# looked up every 0.5 s and their ticks summed; a process that exits loses at most its last sample.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
TICKS=0
ticks_of() {
    local f
    TICKS=''
    { read -r -a f <"/proc/$1/stat"; } 2>/dev/null || return 1
    # Fields after the command name, which holds no spaces for postgres processes.
    TICKS=$(( f[13] + f[14] ))
}

# watch_cpu APPLIER OUTFILE: writes "<applier backend ticks> <walsender ticks>" until $WORK/stop exists.
watch_cpu() {
    local who=$1 out=$2 target=${TARGET[$1]} wpid='' a=0 w=0 sample=0 pid lookup
    local -A last=()
    if is_stagingprop "$who"; then
        lookup="SELECT pid FROM pg_stat_activity WHERE datname = 'shop' AND backend_type = 'client backend'
                   AND pid <> pg_backend_pid()"
    else
        lookup="SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_$who' AND relid IS NULL AND pid IS NOT NULL"
    fi
    while [[ ! -e $WORK/stop ]]; do
        # Every sample until the first process shows up, then every 0.5 s.
        if (( ${#last[@]} == 0 || sample % 10 == 0 )); then
            for pid in $(q "$target" -c "$lookup"); do
                [[ -n ${last[$pid]:-} ]] || last[$pid]=0
            done
        fi
        sample=$((sample + 1))
        if [[ -z $wpid ]]; then
            wpid=$(q staging -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '${SLOT[$who]}' AND active_pid IS NOT NULL")
        fi
        a=0
        for pid in "${!last[@]}"; do
            if ticks_of "$pid"; then last[$pid]=$TICKS; fi
            a=$((a + last[$pid]))
        done
        if [[ -n $wpid ]] && ticks_of "$wpid"; then w=$TICKS; fi
        echo "$a $w" >"$out.tmp"
        mv "$out.tmp" "$out"
        sleep 0.05
    done
}

start_watch() {
    rm -f "$WORK/stop" "$WORK/cpu.$1"
    watch_cpu "$1" "$WORK/cpu.$1" &
    WATCH_PID=$!
}
# Sets BACKEND_CPU and WALSENDER_CPU (seconds).
stop_watch() {
    local a w
    touch "$WORK/stop"
    wait "$WATCH_PID" || true
    WATCH_PID=''
    read -r a w <"$WORK/cpu.$1"
    BACKEND_CPU=$(awk -v t="$a" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    WALSENDER_CPU=$(awk -v t="$w" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
}

# run_stagingprop APPLIER LABEL: `sync --until-caught-up`; sets SECONDS_TAKEN, RSS_MB, PROCESS_CPU.
run_stagingprop() {
    local who=$1 label=$2 t0 t1 rc=0 hwm=0 v cpu_user=0 cpu_sys=0 ticks=0
    local bin=${SP_BINARY[$who]} config=$WORK/$who.toml log=$WORK/$who.$label.log
    start_watch "$who"
    t0=$(now)
    if (( HAVE_TIME )); then
        /usr/bin/time -f '%U %S %M' -o "$WORK/rss.$who.$label" \
            "${SP_WRAPPER[@]}" "$bin" --config "$config" sync --until-caught-up >"$WORK/report.$who.$label.txt" 2>"$log" || rc=$?
        t1=$(now)
        read -r cpu_user cpu_sys hwm < <(tail -n 1 "$WORK/rss.$who.$label")
    else
        "${SP_WRAPPER[@]}" "$bin" --config "$config" sync --until-caught-up >"$WORK/report.$who.$label.txt" 2>"$log" &
        SYNC_PID=$!
        while kill -0 "$SYNC_PID" 2>/dev/null; do
            v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$SYNC_PID/status" 2>/dev/null || true)
            [[ -n $v ]] && (( v > hwm )) && hwm=$v
            if ticks_of "$SYNC_PID"; then ticks=$TICKS; fi
            sleep 0.05
        done
        wait "$SYNC_PID" || rc=$?
        t1=$(now)
        SYNC_PID=''
        cpu_user=$(awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    fi
    stop_watch "$who"
    PROCESS_CPU=$(awk -v u="$cpu_user" -v s="$cpu_sys" 'BEGIN { printf "%.2f", u + s }')
    if (( rc != 0 )); then
        tail -n 30 "$log" >&2
        die "$who sync failed (exit $rc)"
    fi
    SECONDS_TAKEN=$(elapsed "$t0" "$t1")
    RSS_MB=$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')
    log "$who: caught up in $SECONDS_TAKEN s, peak RSS $RSS_MB MB; CPU s: process $PROCESS_CPU (user $cpu_user), production backends $BACKEND_CPU, staging walsender $WALSENDER_CPU"
}

# run_native PEER MARKER: enables the subscription and waits for the marker row; sets SECONDS_TAKEN.
# The launcher starts apply workers at most once per wal_retrieve_retry_interval (5 s): wait that
# long after the previous start, so that the timing does not include the launcher's back-off.
declare -A LAST_START=()
run_native() {
    local who=$1 marker=$2 t0 t1 retry wait target=${TARGET[$1]}
    retry=$(q "$target" -c "SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'")
    wait=$(awk -v last="${LAST_START[$who]:-0}" -v now="$(now)" -v r="$retry" 'BEGIN { w = last + r + 0.5 - now; print (w > 0 ? w : 0) }')
    sleep "$wait"
    start_watch "$who"
    t0=$(now)
    LAST_START[$who]=$t0
    q "$target" -c "ALTER SUBSCRIPTION bench_$who ENABLE" \
        -c "DO \$\$ BEGIN
              WHILE NOT EXISTS (SELECT 1 FROM bench_marker WHERE id = $marker) LOOP
                  PERFORM pg_sleep(0.05);
              END LOOP;
            END \$\$"
    t1=$(now)
    stop_watch "$who"
    q "$target" -c "ALTER SUBSCRIPTION bench_$who DISABLE"
    SECONDS_TAKEN=$(elapsed "$t0" "$t1")
    PROCESS_CPU=0
    RSS_MB=-
    log "$who: caught up in $SECONDS_TAKEN s (remote_lsn $(q "$target" -c "SELECT remote_lsn FROM pg_replication_origin_status")); CPU s: apply workers $BACKEND_CPU, staging walsender $WALSENDER_CPU"
}

# Drains slot $1 with pg_recvlogical up to LSN $2 (extra -o options follow); sets DRAIN_SECONDS.
drain() {
    local slot=$1 endpos=$2 t0 t1
    shift 2
    t0=$(now)
    "$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "${PORT[staging]}" -U postgres -d shop --slot "$slot" \
        --start --endpos "$endpos" -F 0 -f /dev/null -o publication_names=stagingprop "$@" \
        2>"$WORK/recvlogical.$slot.log" || { cat "$WORK/recvlogical.$slot.log" >&2; die "pg_recvlogical $slot failed"; }
    t1=$(now)
    DRAIN_SECONDS=$(elapsed "$t0" "$t1")
}

# measure SCENARIO ROUND MARKER ROWS APPLIER...: every applier on the same backlog, in the order
# given. RESULT["SCENARIO ROUND APPLIER"] = "seconds rss process-cpu backend-cpu walsender-cpu".
declare -A RESULT CEILING ROWS_OF
measure() {
    local scenario=$1 round=$2 marker=$3 rows=$4 who endpos
    shift 4
    ROWS_OF[$scenario $round]=$rows
    q staging -c "INSERT INTO bench_marker VALUES ($marker, now())"
    settle
    # After settle's checkpoint (as where stagingprop stops), so that the ceiling slots too have
    # confirmed a running-transactions record when the next scenario brings them forward.
    endpos=$(q staging -c "SELECT pg_current_wal_lsn()")
    log "backlog (WAL behind confirmed_flush_lsn / restart_lsn): $(q staging -c "SELECT string_agg(slot_name || ' ' ||
            pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) || ' / ' ||
            pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), ', ' ORDER BY slot_name) FROM pg_replication_slots")"
    log "($scenario) round $round, in the order: $*"
    for who in "$@"; do
        if is_stagingprop "$who"; then
            run_stagingprop "$who" "$scenario$round"
        else
            run_native "$who" "$marker"
        fi
        RESULT[$scenario $round $who]="$SECONDS_TAKEN $RSS_MB $PROCESS_CPU $BACKEND_CPU $WALSENDER_CPU"
        q staging -c "CHECKPOINT"
    done
    drain bench_ceiling "$endpos" -o proto_version=1
    local plain=$DRAIN_SECONDS
    drain bench_ceiling_streaming "$endpos" -o proto_version=2 -o streaming=on
    local streaming=$DRAIN_SECONDS
    # The same as protocol 1 with binary values: what binary transfer would spare the walsender.
    drain bench_ceiling_binary "$endpos" -o proto_version=1 -o binary=true
    CEILING[$scenario $round]="$plain $streaming $DRAIN_SECONDS"
    log "ceiling: staging's walsender alone sends it in $plain s (protocol 1), $streaming s (protocol 2, streaming), $DRAIN_SECONDS s (protocol 1, binary)"
    verify "($scenario) round $round"
    for who in "${APPLIERS[@]}"; do
        RESULT[$scenario $round $who]+=" ${VERDICT[$who]}"
    done
}

# ---------------------------------------------------------------------------------------------
CLUSTER_LIST=(staging)
for who in "${APPLIERS[@]}"; do CLUSTER_LIST+=("${TARGET[$who]}"); done
log "work directory $WORK; PostgreSQL binaries $PGBIN"
log "loading $PRODUCTS products ($(( PRODUCTS * 2 )) descriptions, $OFFERS offers, $(( OFFERS * CURRENCIES )) prices) into ${#CLUSTER_LIST[@]} clusters"
start_with_seed "${CLUSTER_LIST[@]}"
log "clusters: $(for c in "${CLUSTER_LIST[@]}"; do printf '%s :%s  ' "$c" "${PORT[$c]}"; done)"
verify "seed"
(( FAILED == 0 )) || die "the seed differs between clusters"
SERVER_VERSION_NUM=$(q staging -c "SHOW server_version_num")

write_configs
for who in "${APPLIERS[@]}"; do
    is_stagingprop "$who" || continue
    log "$who: init"
    "${SP_BINARY[$who]}" --config "$WORK/$who.toml" init >"$WORK/init.$who.log" 2>&1 || { cat "$WORK/init.$who.log" >&2; die "$who init failed"; }
done
# The best settings for this machine: binary transfer, and large transactions applied while they
# stream (by parallel apply workers on 16+).
BEST_STREAMING=on
(( SERVER_VERSION_NUM >= 160000 )) && BEST_STREAMING=parallel
declare -A SUB_OPTIONS=([native]="" [best]=", binary = true, streaming = $BEST_STREAMING")
for who in "${PEERS[@]}"; do
    q "${TARGET[$who]}" -c "CREATE SUBSCRIPTION bench_$who
               CONNECTION 'host=127.0.0.1 port=${PORT[staging]} dbname=shop user=postgres'
               PUBLICATION stagingprop
               WITH (copy_data = false, enabled = false, slot_name = 'bench_$who',
                     synchronous_commit = '$NATIVE_SYNCHRONOUS_COMMIT'${SUB_OPTIONS[$who]})"
done
q staging -c "SELECT pg_create_logical_replication_slot('bench_ceiling', 'pgoutput')" \
    -c "SELECT pg_create_logical_replication_slot('bench_ceiling_streaming', 'pgoutput')" \
    -c "SELECT pg_create_logical_replication_slot('bench_ceiling_binary', 'pgoutput')" >/dev/null

SETTINGS_SQL="SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name) FROM pg_settings
             WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method', 'shared_buffers',
                            'max_wal_size', 'checkpoint_timeout', 'autovacuum', 'logical_decoding_work_mem', 'work_mem')"
SETTINGS=$(q staging -F ' ' -c "$SETTINGS_SQL")
for c in "${CLUSTER_LIST[@]}"; do
    other=$(q "$c" -F ' ' -c "$SETTINGS_SQL")
    [[ $other == "$SETTINGS" ]] || die "settings of $c differ from staging's: $other"
done
log "settings on all clusters: $SETTINGS"

# Odd rounds: stagingprop first in (a), last in (b); even rounds the reverse.
reversed() { local i out=(); for (( i = $#; i >= 1; i-- )); do out+=("${!i}"); done; echo "${out[@]}"; }
marker=0
for (( round = 1; round <= ROUNDS; round++ )); do
    order=("${APPLIERS[@]}")
    (( round % 2 == 0 )) && read -r -a order <<<"$(reversed "${APPLIERS[@]}")"

    log "(a) round $round: $BACKLOG_TXNS OLTP transactions on staging ($CLIENTS clients) while every applier is stopped"
    before=$(rows_written)
    t0=$(now)
    oltp_backlog "$WORK/pgbench.log"
    t1=$(now)
    A_TXNS=$(awk '/number of transactions actually processed/ { split($NF, a, "/"); print a[1] }' "$WORK/pgbench.log")
    rows=$(( $(rows_written) - before ))
    log "(a) staging committed $A_TXNS transactions changing $rows rows in $(elapsed "$t0" "$t1") s"
    marker=$((marker + 1))
    measure a "$round" "$marker" "$rows" "${order[@]}"

    log "(b) round $round: one staging transaction updating $BIG_ROWS offerprice rows"
    before=$(rows_written)
    t0=$(now)
    q staging -c "UPDATE offerprice p SET price = p.price + 1
                    FROM (SELECT offer_id, currency FROM offerprice ORDER BY offer_id, currency LIMIT $BIG_ROWS) s
                   WHERE p.offer_id = s.offer_id AND p.currency = s.currency"
    t1=$(now)
    rows=$(( $(rows_written) - before ))
    log "(b) staging committed 1 transaction changing $rows rows in $(elapsed "$t0" "$t1") s"
    marker=$((marker + 1))
    read -r -a order <<<"$(reversed "${order[@]}")"
    measure b "$round" "$marker" "$rows" "${order[@]}"
done

# ---------------------------------------------------------------------------------------------
describe() {
    case $1 in
        a) echo "(a) backlog of $A_TXNS OLTP txns" ;;
        b) echo "(b) one txn updating offerprice" ;;
    esac
}
field() { local -a f; read -r -a f <<<"${RESULT[$1]}"; echo "${f[$2]}"; }
{
    echo
    echo "stagingprop e2e sync benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version')"
    echo "settings (all clusters): $SETTINGS"
    echo "native: subscription with PostgreSQL's defaults (streaming = off, binary = false); best: binary = true, streaming = $BEST_STREAMING;"
    echo "  both synchronous_commit = $NATIVE_SYNCHRONOUS_COMMIT. stagingprop: asynchronous commits confirmed once flushed, default [sync]${SYNC_CONF:+, plus: $SYNC_CONF}"
    [[ -n $SP_BASE_BIN ]] && echo "base: $SP_BASE_BIN (the same config)"
    if (( SCOPED )); then echo "scoped: catentdesc WHERE language_id = -1 without longdescription, offerprice WHERE offer_id % 2 = 1 (all appliers)"; fi
    echo "$ROUNDS rounds; seconds = time to catch up; ratio = stagingprop s / peer s (< 1: stagingprop is faster)"
    echo
    printf '%-34s %5s %9s |' scenario round rows
    for who in "${APPLIERS[@]}"; do printf ' %11s' "$who s"; done
    for who in "${APPLIERS[@]:1}"; do printf ' %9s' "sp/$who"; done
    printf ' | %7s | %s\n' "sp RSS" verify
    for s in a b; do
        for (( round = 1; round <= ROUNDS; round++ )); do
            printf '%-34s %5d %9d |' "$(describe "$s")" "$round" "${ROWS_OF[$s $round]}"
            for who in "${APPLIERS[@]}"; do printf ' %11.2f' "$(field "$s $round $who" 0)"; done
            for who in "${APPLIERS[@]:1}"; do
                printf ' %9.2f' "$(ratio "$(field "$s $round stagingprop" 0)" "$(field "$s $round $who" 0)")"
            done
            printf ' | %4s MB | %s\n' "$(field "$s $round stagingprop" 1)" \
                "$(for who in "${APPLIERS[@]}"; do printf '%s ' "$(field "$s $round $who" 5)"; done)"
        done
    done
    echo
    echo "Ratios over the rounds, median (min-max); < 1: stagingprop is faster:"
    for s in a b; do
        for who in "${APPLIERS[@]:1}"; do
            values=''
            for (( round = 1; round <= ROUNDS; round++ )); do
                values+=" $(ratio "$(field "$s $round stagingprop" 0)" "$(field "$s $round $who" 0)")"
            done
            printf '%-34s stagingprop / %-6s %s\n' "$(describe "$s")" "$who" "$(spread "$values")"
        done
    done
    echo
    echo "CPU seconds while catching up, median over the rounds (less sensitive than wall time to other load):"
    printf '%-34s |' scenario
    for who in "${APPLIERS[@]}"; do printf ' %22s' "$who (own+target)"; done
    printf ' | %9s\n' walsender
    for s in a b; do
        printf '%-34s |' "$(describe "$s")"
        walsender=''
        for who in "${APPLIERS[@]}"; do
            own='' target=''
            for (( round = 1; round <= ROUNDS; round++ )); do
                own+=" $(field "$s $round $who" 2)"
                target+=" $(field "$s $round $who" 3)"
                [[ $who == stagingprop ]] && walsender+=" $(field "$s $round $who" 4)"
            done
            printf ' %10.2f + %9.2f' "$(median "$own")" "$(median "$target")"
        done
        printf ' | %9.2f\n' "$(median "$walsender")"
    done
    echo "(own = the stagingprop process; target = its production sessions, or the native apply workers;"
    echo " walsender = the decoding work on staging for stagingprop, the same job for every applier)"
    echo
    echo "Ceiling: staging's walsender alone (pg_recvlogical into /dev/null), median over the rounds:"
    printf '%-34s | %10s %10s %10s | %s\n' scenario "proto 1 s" "stream s" "binary s" "sp / stream ceiling"
    for s in a b; do
        p1='' st='' bi='' over=''
        for (( round = 1; round <= ROUNDS; round++ )); do
            read -r cp cs cb <<<"${CEILING[$s $round]}"
            p1+=" $cp" st+=" $cs" bi+=" $cb"
            over+=" $(ratio "$(field "$s $round stagingprop" 0)" "$cs")"
        done
        printf '%-34s | %10.2f %10.2f %10.2f | %s\n' "$(describe "$s")" "$(median "$p1")" "$(median "$st")" \
            "$(median "$bi")" "$(spread "$over")"
    done
}
(( FAILED == 0 )) || die "a target differs from staging"
