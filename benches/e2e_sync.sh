#!/usr/bin/env bash
# End-to-end benchmark: stagingprop `sync` against PostgreSQL's own logical replication
# (CREATE SUBSCRIPTION) on the same workload, the same staging database and equal targets.
#
#   benches/e2e_sync.sh                      # from the repository root
#   BACKLOG_TXNS=5000 BIG_ROWS=200000 benches/e2e_sync.sh   # a quicker, smaller run
#
# It builds the release binary, starts three throwaway PostgreSQL clusters on free loopback
# ports (staging; "prod", the target of stagingprop; "native", the subscriber of a native
# subscription), loads the same catalogue into all three, and measures two scenarios, each for
# both appliers, one after the other (never concurrently):
#
#   (a) backlog catch-up: the applier is stopped (stagingprop not running, the subscription
#       disabled) while staging commits BACKLOG_TXNS small OLTP transactions (pgbench); then the
#       applier is started and timed until its target has the last of them.
#   (b) one big transaction: one staging transaction updating BIG_ROWS offerprice rows, then the
#       same catch-up timing.
#
# "Caught up" is exact for both: after each workload, one more transaction inserts a marker row
# (bench_marker, a replicated table). Both appliers apply in commit order, so the marker being
# visible on the target means everything before it is there. stagingprop is timed as the wall
# time of `sync --until-caught-up` (start-up included), which stops at staging's WAL position
# when it starts, i.e. after the marker. The native subscription is timed from
# `ALTER SUBSCRIPTION ... ENABLE` until the marker is visible on the subscriber (polled every
# 50 ms in one server-side loop, no client round trips).
#
# After every scenario the four catalogue tables (and the marker table) of both targets are
# compared with staging (md5 of every row in key order); a mismatch fails the run (exit 1).
#
# The ceiling: two more slots, created with the others, are drained after each scenario by
# pg_recvlogical into /dev/null up to the marker's position, once with pgoutput protocol 1 (what
# the native subscription receives with its default streaming=off) and once with protocol 2 and
# streaming=on (in-progress transactions are sent while decoding instead of spilled to disk
# first; what stagingprop asks for by default, [sync] streaming = true). No applier can catch up faster than
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
#   NATIVE_SYNCHRONOUS_COMMIT=off   the subscription's synchronous_commit (PostgreSQL's default
#                         for subscriptions is off; stagingprop commits asynchronously too and confirms once flushed)
#   PG_EXTRA_CONF=''      extra postgresql.conf lines for all three clusters (';'-separated)
#   SYNC_CONF=''          extra [sync] lines of stagingprop's config (';'-separated), e.g.
#                         SYNC_CONF='batch_max_delay_ms = 1000'
#   SCOPED=1              manage two tables in part (issue 15): catentdesc only language -1 and
#                         without longdescription, offerprice only odd offers (half the rows of
#                         both scenarios); the native subscription reads the same publication,
#                         so it gets the same row filters and column list. Both targets are then
#                         compared with each other instead of with staging.
#   KEEP=1                keep the work directory (server logs, stagingprop logs) at exit
#   SP_WRAPPER=''         a command prefix for `stagingprop sync` (diagnosis), e.g.
#                         SP_WRAPPER="perf record -F 999 -g -o /tmp/sp.perf --"
#   STAGINGPROP_PG_BIN    directory of initdb/pg_ctl/psql/pgbench (default: newest
#                         /usr/lib/postgresql/*/bin, then pg_config --bindir, then PATH)
#   CARGO_TARGET_DIR      as for cargo
set -euo pipefail

PRODUCTS=${PRODUCTS:-50000}
BACKLOG_TXNS=${BACKLOG_TXNS:-30000}
CLIENTS=${CLIENTS:-2}
BIG_ROWS=${BIG_ROWS:-1000000}
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
require_pg_tools initdb pg_ctl psql pgbench
(( BACKLOG_TXNS >= CLIENTS && PRODUCTS >= CLIENTS )) || die "BACKLOG_TXNS and PRODUCTS must be >= CLIENTS"

build_stagingprop

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

FAILED=0
verify() {
    local label=$1 s p n
    s=$(fingerprint staging)
    p=$(fingerprint prod)
    n=$(fingerprint native)
    # Scoped: both targets hold staging's in-scope rows over the same seed, so they must agree.
    if (( SCOPED )); then s=$n; fi
    if [[ $p == "$s" ]]; then log "$label: stagingprop target MATCH"; VERIFY_SP=MATCH
    else log "$label: stagingprop target MISMATCH"; log "  staging: $s"; log "  prod:    $p"; VERIFY_SP=MISMATCH; FAILED=1; fi
    if [[ $n == "$s" ]]; then log "$label: native subscriber MATCH"; VERIFY_NATIVE=MATCH
    else log "$label: native subscriber MISMATCH"; log "  staging: $s"; log "  native:  $n"; VERIFY_NATIVE=MISMATCH; FAILED=1; fi
}

settle() {
    local c
    for c in staging prod native; do
        q "$c" -c "VACUUM ANALYZE" -c "CHECKPOINT"
    done
}

# ---------------------------------------------------------------------------------------------
# Appliers
write_config() {
    SP_RULES=()
    if (( SCOPED )); then
        SP_RULES[catentdesc]=$(printf '%s\n' 'filter = "language_id = -1"' 'exclude_columns = ["longdescription"]')
        SP_RULES[offerprice]='filter = "offer_id % 2 = 1"'
    fi
    SP_SYNC=$SYNC_CONF write_sp_config "$WORK/stagingprop.toml" prod stagingprop "${TABLES[@]}"
}

HAVE_TIME=0
[[ -x /usr/bin/time ]] && /usr/bin/time -f '%M' true 2>/dev/null && HAVE_TIME=1

# CPU time of the server processes doing the work, read from /proc while an applier runs (the
# machine may be shared, so wall time alone is noisy): the applying backend on the target
# (stagingprop's production session, or the native apply worker) and the walsender decoding
# the slot on staging. Sampled every 50 ms; a process that exits loses at most its last sample.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
TICKS=0
ticks_of() {
    local f
    TICKS=''
    { read -r -a f <"/proc/$1/stat"; } 2>/dev/null || return 1
    # Fields after the command name, which holds no spaces for postgres processes.
    TICKS=$(( f[13] + f[14] ))
}

# watch_cpu KIND OUTFILE: writes "<applier backend ticks> <walsender ticks>" until $WORK/stop exists.
# stagingprop may use more than one production session (a streamed transaction has its own):
# its backends are looked up every 0.5 s and their ticks summed.
watch_cpu() {
    local kind=$1 out=$2 apid='' wpid='' a=0 w=0 slot=stagingprop sample=0 pid
    local -A last=()
    [[ $kind == native ]] && slot=bench_native
    while [[ ! -e $WORK/stop ]]; do
        if [[ $kind == native && -z $apid ]]; then
            apid=$(q native -c "SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_native' AND relid IS NULL AND pid IS NOT NULL")
            [[ -n $apid ]] && last[$apid]=0
        elif [[ $kind != native ]] && (( sample % 10 == 0 )); then
            for pid in $(q prod -c "SELECT pid FROM pg_stat_activity WHERE datname = 'shop' AND backend_type = 'client backend'
                                     AND pid <> pg_backend_pid()"); do
                [[ -n ${last[$pid]:-} ]] || last[$pid]=0
            done
        fi
        sample=$((sample + 1))
        if [[ -z $wpid ]]; then
            wpid=$(q staging -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$slot' AND active_pid IS NOT NULL")
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

WATCH_PID=''
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

# Runs `stagingprop sync --until-caught-up`; sets SP_SECONDS and SP_RSS_MB.
run_stagingprop() {
    local label=$1 t0 t1 rc=0 hwm=0 v cpu_user=0 cpu_sys=0 ticks=0
    start_watch stagingprop
    t0=$(now)
    if (( HAVE_TIME )); then
        /usr/bin/time -f '%U %S %M' -o "$WORK/rss.$label" \
            "${SP_WRAPPER[@]}" "$BIN" --config "$WORK/stagingprop.toml" sync --until-caught-up >"$WORK/report.$label.txt" 2>"$WORK/stagingprop.$label.log" || rc=$?
        t1=$(now)
        read -r cpu_user cpu_sys hwm < <(tail -n 1 "$WORK/rss.$label")
    else
        "${SP_WRAPPER[@]}" "$BIN" --config "$WORK/stagingprop.toml" sync --until-caught-up >"$WORK/report.$label.txt" 2>"$WORK/stagingprop.$label.log" &
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
    stop_watch stagingprop
    SP_PROCESS_CPU=$(awk -v u="$cpu_user" -v s="$cpu_sys" 'BEGIN { printf "%.2f", u + s }')
    SP_BACKEND_CPU=$BACKEND_CPU
    SP_WALSENDER_CPU=$WALSENDER_CPU
    if (( rc != 0 )); then
        tail -n 30 "$WORK/stagingprop.$label.log" >&2
        die "stagingprop sync failed (exit $rc)"
    fi
    SP_SECONDS=$(elapsed "$t0" "$t1")
    SP_RSS_MB=$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')
    log "stagingprop: caught up in $SP_SECONDS s, peak RSS $SP_RSS_MB MB; CPU s: stagingprop $SP_PROCESS_CPU (user $cpu_user), production backend $SP_BACKEND_CPU, staging walsender $SP_WALSENDER_CPU"
}

# Enables the subscription and waits for the marker row; sets NATIVE_SECONDS.
# The launcher starts apply workers at most once per wal_retrieve_retry_interval (5 s): wait that
# long after the previous start, so that the timing does not include the launcher's back-off.
NATIVE_LAST_START=0
run_native() {
    local marker=$1 t0 t1 retry wait
    retry=$(q native -c "SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'")
    wait=$(awk -v last="$NATIVE_LAST_START" -v now="$(now)" -v r="$retry" 'BEGIN { w = last + r + 0.5 - now; print (w > 0 ? w : 0) }')
    sleep "$wait"
    start_watch native
    t0=$(now)
    NATIVE_LAST_START=$t0
    q native -c "ALTER SUBSCRIPTION bench_native ENABLE" \
        -c "DO \$\$ BEGIN
              WHILE NOT EXISTS (SELECT 1 FROM bench_marker WHERE id = $marker) LOOP
                  PERFORM pg_sleep(0.05);
              END LOOP;
            END \$\$"
    t1=$(now)
    stop_watch native
    q native -c "ALTER SUBSCRIPTION bench_native DISABLE"
    NATIVE_SECONDS=$(elapsed "$t0" "$t1")
    NATIVE_BACKEND_CPU=$BACKEND_CPU
    NATIVE_WALSENDER_CPU=$WALSENDER_CPU
    log "native: caught up in $NATIVE_SECONDS s (remote_lsn $(q native -c "SELECT remote_lsn FROM pg_replication_origin_status")); CPU s: apply worker $NATIVE_BACKEND_CPU, staging walsender $NATIVE_WALSENDER_CPU"
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

# Both appliers on the same backlog; the order alternates between scenarios.
declare -A RESULT CPU CEILING
measure() {
    local scenario=$1 marker=$2 rows=$3 first=$4 who endpos
    q staging -c "INSERT INTO bench_marker VALUES ($marker, now())"
    endpos=$(q staging -c "SELECT pg_current_wal_lsn()")
    log "backlog (WAL behind confirmed_flush_lsn / restart_lsn): $(q staging -c "SELECT string_agg(slot_name || ' ' ||
            pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) || ' / ' ||
            pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), ', ' ORDER BY slot_name) FROM pg_replication_slots")"
    settle
    local order=(stagingprop native)
    [[ $first == native ]] && order=(native stagingprop)
    for who in "${order[@]}"; do
        if [[ $who == stagingprop ]]; then
            run_stagingprop "$scenario"
        else
            run_native "$marker"
        fi
        q staging -c "CHECKPOINT"
    done
    drain bench_ceiling "$endpos" -o proto_version=1
    local plain=$DRAIN_SECONDS
    drain bench_ceiling_streaming "$endpos" -o proto_version=2 -o streaming=on
    local streaming=$DRAIN_SECONDS
    # The same as protocol 1 with binary values: what binary transfer would spare the walsender.
    drain bench_ceiling_binary "$endpos" -o proto_version=1 -o binary=true
    CEILING[$scenario]="$plain $streaming $DRAIN_SECONDS"
    log "ceiling with binary = true (protocol 1): $DRAIN_SECONDS s"
    log "ceiling: staging's walsender alone sends it in $plain s (protocol 1), $streaming s (protocol 2, streaming)"
    verify "$scenario"
    RESULT[$scenario]="$rows $SP_SECONDS $NATIVE_SECONDS $SP_RSS_MB $VERIFY_SP $VERIFY_NATIVE"
    CPU[$scenario]="$SP_PROCESS_CPU $SP_BACKEND_CPU $SP_WALSENDER_CPU $NATIVE_BACKEND_CPU $NATIVE_WALSENDER_CPU"
}

# ---------------------------------------------------------------------------------------------
log "work directory $WORK; PostgreSQL binaries $PGBIN"
log "loading $PRODUCTS products ($(( PRODUCTS * 2 )) descriptions, $OFFERS offers, $(( OFFERS * CURRENCIES )) prices) into three clusters"
start_with_seed staging prod native
log "clusters: staging :${PORT[staging]}, prod (stagingprop) :${PORT[prod]}, native subscriber :${PORT[native]}"
verify "seed"
(( FAILED == 0 )) || die "the seed differs between clusters"

write_config
log "stagingprop init"
"$BIN" --config "$WORK/stagingprop.toml" init >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; die "stagingprop init failed"; }
q native -c "CREATE SUBSCRIPTION bench_native
               CONNECTION 'host=127.0.0.1 port=${PORT[staging]} dbname=shop user=postgres'
               PUBLICATION stagingprop
               WITH (copy_data = false, enabled = false, slot_name = 'bench_native',
                     synchronous_commit = '$NATIVE_SYNCHRONOUS_COMMIT')"
q staging -c "SELECT pg_create_logical_replication_slot('bench_ceiling', 'pgoutput')" \
    -c "SELECT pg_create_logical_replication_slot('bench_ceiling_streaming', 'pgoutput')" \
    -c "SELECT pg_create_logical_replication_slot('bench_ceiling_binary', 'pgoutput')" >/dev/null

SETTINGS=$(q staging -F ' ' -c "SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name) FROM pg_settings
             WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method', 'shared_buffers',
                            'max_wal_size', 'checkpoint_timeout', 'autovacuum', 'logical_decoding_work_mem', 'work_mem')")
for c in prod native; do
    other=$(q "$c" -F ' ' -c "SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name) FROM pg_settings
             WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method', 'shared_buffers',
                            'max_wal_size', 'checkpoint_timeout', 'autovacuum', 'logical_decoding_work_mem', 'work_mem')")
    [[ $other == "$SETTINGS" ]] || die "settings of $c differ from staging's: $other"
done
log "settings on all three clusters: $SETTINGS"

# --- (a) backlog catch-up --------------------------------------------------------------------
log "(a) $BACKLOG_TXNS OLTP transactions on staging ($CLIENTS clients) while both appliers are stopped"
before=$(rows_written)
t0=$(now)
oltp_backlog "$WORK/pgbench.log"
t1=$(now)
A_TXNS=$(awk '/number of transactions actually processed/ { split($NF, a, "/"); print a[1] }' "$WORK/pgbench.log")
A_ROWS=$(( $(rows_written) - before ))
log "(a) staging committed $A_TXNS transactions changing $A_ROWS rows in $(elapsed "$t0" "$t1") s"
measure a 1 "$A_ROWS" stagingprop

# --- (b) one big transaction -----------------------------------------------------------------
log "(b) one staging transaction updating $BIG_ROWS offerprice rows"
before=$(rows_written)
t0=$(now)
q staging -c "UPDATE offerprice p SET price = p.price + 1
                FROM (SELECT offer_id, currency FROM offerprice ORDER BY offer_id, currency LIMIT $BIG_ROWS) s
               WHERE p.offer_id = s.offer_id AND p.currency = s.currency"
t1=$(now)
B_ROWS=$(( $(rows_written) - before ))
log "(b) staging committed 1 transaction changing $B_ROWS rows in $(elapsed "$t0" "$t1") s"
measure b 2 "$B_ROWS" native

# ---------------------------------------------------------------------------------------------
describe() {
    case $1 in
        a) echo "(a) backlog of $A_TXNS OLTP txns" ;;
        b) echo "(b) one txn updating offerprice" ;;
    esac
}
{
    echo
    echo "stagingprop e2e sync benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version')"
    echo "settings (all clusters): $SETTINGS"
    echo "native subscription: synchronous_commit=$NATIVE_SYNCHRONOUS_COMMIT, streaming=off, binary=false; stagingprop: asynchronous commits confirmed once flushed, default [sync] batching and streaming=on${SYNC_CONF:+, plus: $SYNC_CONF}"
    if (( SCOPED )); then echo "scoped: catentdesc WHERE language_id = -1 without longdescription, offerprice WHERE offer_id % 2 = 1 (both appliers)"; fi
    echo "seconds = time to catch up (ratio = stagingprop s / native s; < 1 means stagingprop is faster)"
    echo
    printf '%-36s %9s | %9s %10s | %9s %10s | %7s | %8s | %s\n' \
        scenario rows "sp s" "sp rows/s" "native s" "nat rows/s" ratio "sp RSS" verify
    for s in a b; do
        read -r rows sps ns rss vsp vn <<<"${RESULT[$s]}"
        printf '%-36s %9d | %9.2f %10.0f | %9.2f %10.0f | %7.2f | %6s MB | sp %s, native %s\n' \
            "$(describe "$s")" "$rows" "$sps" "$(awk -v r="$rows" -v t="$sps" 'BEGIN { print r / t }')" \
            "$ns" "$(awk -v r="$rows" -v t="$ns" 'BEGIN { print r / t }')" \
            "$(awk -v a="$sps" -v b="$ns" 'BEGIN { print a / b }')" "$rss" "$vsp" "$vn"
    done
    echo
    echo "CPU seconds while catching up (less sensitive than wall time to other load on the machine):"
    printf '%-36s | %11s %11s %8s %9s | %11s %9s | %9s\n' scenario "sp process" "prod backnd" "sp total" walsender \
        "apply wrkr" walsender "CPU ratio"
    for s in a b; do
        read -r spp spb spw nb nw <<<"${CPU[$s]}"
        printf '%-36s | %11.2f %11.2f %8.2f %9.2f | %11.2f %9.2f | %9.2f\n' "$(describe "$s")" "$spp" "$spb" \
            "$(awk -v a="$spp" -v b="$spb" 'BEGIN { print a + b }')" "$spw" "$nb" "$nw" \
            "$(awk -v a="$spp" -v b="$spb" -v n="$nb" 'BEGIN { print (n > 0 ? (a + b) / n : 0) }')"
    done
    echo "(sp total = stagingprop process + its production backend; CPU ratio = sp total / native apply worker;"
    echo " the walsender columns are the decoding work on staging, the same job for both)"
    echo
    echo "Ceiling: staging's walsender alone (pg_recvlogical into /dev/null); the most any applier can beat native by here:"
    printf '%-36s | %10s %13s | %10s %13s | %s | %s\n' scenario "proto 1 s" "native/proto1" "stream s" "native/stream" "sp/ceiling (stream)" "binary s (binary/proto1)"
    for s in a b; do
        read -r cp cs cb <<<"${CEILING[$s]}"
        read -r rows sps ns rss vsp vn <<<"${RESULT[$s]}"
        printf '%-36s | %10.2f %12.2fx | %10.2f %12.2fx | %.2f | %s\n' "$(describe "$s")" "$cp" \
            "$(awk -v n="$ns" -v c="$cp" 'BEGIN { print n / c }')" "$cs" \
            "$(awk -v n="$ns" -v c="$cs" 'BEGIN { print n / c }')" \
            "$(awk -v a="$sps" -v c="$cs" 'BEGIN { print a / c }')" \
            "$cb ($(awk -v b="$cb" -v c="$cp" 'BEGIN { printf "%.2f", b / c }'))"
    done
}
(( FAILED == 0 )) || die "a target differs from staging"
