# Shared by the end-to-end benchmark scripts (sourced, not run): logging, the PostgreSQL
# binaries, the release build, and throwaway clusters on free loopback ports, run as the
# postgres OS user when the script runs as root. The sourcing script sets WORK, KEEP and
# PG_EXTRA_CONF first, and calls stop_clusters from its EXIT trap.

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# median "V1 V2 ...": the median of space-separated numbers.
median() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# spread "V1 V2 ...": "median (min-max, n runs)" of space-separated ratios, two decimals.
spread() {
    tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{ a[NR] = $1 } END {
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%.2f (%.2f-%.2f, %d runs)", m, a[1], a[NR], NR }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }

# The directory of initdb: STAGINGPROP_PG_BIN, the newest /usr/lib/postgresql/*/bin,
# pg_config --bindir, then PATH.
find_pg_bin() {
    if [[ -n ${STAGINGPROP_PG_BIN:-} ]]; then
        echo "$STAGINGPROP_PG_BIN"
        return
    fi
    local best='' v d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb ]] || continue
        v=$(basename "$(dirname "$d")")
        if [[ -z $best || $v -gt $(basename "$(dirname "$best")") ]]; then best=$d; fi
    done
    if [[ -n $best ]]; then echo "$best"; return; fi
    if command -v pg_config >/dev/null && [[ -x $(pg_config --bindir)/initdb ]]; then
        pg_config --bindir
        return
    fi
    dirname "$(command -v initdb || die "PostgreSQL server binaries (initdb) not found; set STAGINGPROP_PG_BIN")"
}

# require_pg_tools TOOL...: sets PGBIN and checks that each tool is there. A client tool the
# server's directory lacks (the bundles of scripts/pg-majors.sh hold only the server) comes from
# the newest installed /usr/lib/postgresql/*/bin (clients speak to newer servers): PGBIN is then a
# directory of links to both.
PGBIN_LINKS=''
require_pg_tools() {
    PGBIN=$(find_pg_bin)
    local tool missing=() clients
    for tool in "$@"; do
        [[ -x $PGBIN/$tool ]] || missing+=("$tool")
    done
    (( ${#missing[@]} == 0 )) && return
    clients=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    for tool in "${missing[@]}"; do
        [[ -n $clients && -x $clients/$tool ]] || die "$PGBIN/$tool not found, nor in /usr/lib/postgresql/*/bin (set STAGINGPROP_PG_BIN)"
    done
    PGBIN_LINKS=$(mktemp -d "${TMPDIR:-/tmp}/stagingprop-pgbin.XXXXXX")
    chmod 755 "$PGBIN_LINKS"
    ln -s "$PGBIN"/* "$PGBIN_LINKS"/
    for tool in "${missing[@]}"; do ln -sfn "$clients/$tool" "$PGBIN_LINKS/$tool"; done
    log "server binaries from $PGBIN, ${missing[*]} from $clients"
    PGBIN=$PGBIN_LINKS
}

# Builds the release binary; sets BIN.
build_stagingprop() {
    if [[ -n ${SP_BIN:-} ]]; then
        # A given binary (e.g. an older version's, to compare): no build.
        BIN=$SP_BIN
        [[ -x $BIN ]] || die "SP_BIN=$BIN is not an executable"
        log "using $BIN"
        return
    fi
    log "building stagingprop (release)"
    cargo build --release --bin stagingprop >&2
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/stagingprop
    [[ -x $BIN ]] || die "$BIN not found after the build"
}

# PostgreSQL refuses to run as root: the servers run as the postgres OS user then.
AS_PG=()
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no postgres OS user"
    AS_PG=(runuser -u postgres --)
fi

export PGTZ=UTC PGDATESTYLE=ISO PGCONNECT_TIMEOUT=10
CLUSTERS=()
declare -A PORT

# Stops every cluster started so far and removes WORK (kept with KEEP=1).
stop_clusters() {
    local c
    for c in "${CLUSTERS[@]}"; do
        "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$WORK/$c/data" -m immediate -w stop >/dev/null 2>&1
    done
    [[ -z $PGBIN_LINKS ]] || rm -rf "$PGBIN_LINKS"
    if [[ $KEEP == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}

# A TCP port on 127.0.0.1 nobody listens on (start_cluster retries if it was taken meanwhile).
pick_port() {
    local p
    while :; do
        p=$(( 20000 + RANDOM % 40000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

# start_cluster NAME: initdb into WORK/NAME and start it; sets PORT[NAME].
# fsync, synchronous_commit, full_page_writes, wal_sync_method, shared_buffers, max_wal_size,
# checkpoint_timeout, max_sync_workers_per_subscription: PostgreSQL's defaults, equal on every
# cluster. wal_level is logical everywhere (equal WAL volume whatever the cluster's role).
# Autovacuum is off so that a vacuum started by one phase cannot steal the CPU of the next one
# (2 cores); the scripts vacuum and checkpoint between phases.
start_cluster() {
    local name=$1 dir=$WORK/$1 attempt port
    mkdir -p "$dir"
    [[ ${#AS_PG[@]} -eq 0 ]] || chown postgres: "$dir"
    "${AS_PG[@]}" "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C \
        --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb $name"; }
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "wal_level = logical"
        echo "max_replication_slots = 10"
        echo "max_wal_senders = 10"
        # PostgreSQL's default is 0; `stagingprop copy --atomic` commits split groups with 2PC.
        echo "max_prepared_transactions = ${MAX_PREPARED:-0}"
        echo "autovacuum = off"
        echo "logging_collector = off"
        echo "log_min_messages = warning"
        if [[ -n $PG_EXTRA_CONF ]]; then tr ';' '\n' <<<"$PG_EXTRA_CONF"; fi
    } >>"$dir/data/postgresql.conf"
    for attempt in 1 2 3 4 5; do
        port=$(pick_port)
        echo "port = $port" >>"$dir/data/postgresql.conf"
        if "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null; then
            PORT[$name]=$port
            CLUSTERS+=("$name")
            return
        fi
        log "starting $name on port $port failed (attempt $attempt)"
    done
    tail -n 20 "$dir/server.log" >&2
    die "cannot start the $name cluster"
}

# q CLUSTER [psql args...]: psql on the cluster's shop database, stops on the first error.
q() {
    local name=$1
    shift
    "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PORT[$name]}" -U postgres -d shop "$@"
}

# qpg CLUSTER [psql args...]: the same on the postgres database.
qpg() {
    local name=$1
    shift
    "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PORT[$name]}" -U postgres -d postgres "$@"
}

# write_sp_config FILE TARGET SLOT TABLE...: the stagingprop config of every benchmark, carrying
# TABLEs from the staging cluster (SP_STAGING, default "staging") to cluster TARGET through SLOT
# (publication "stagingprop"). Extra [sync] lines come from SP_SYNC (';'-separated), per-table
# lines from the associative array SP_RULES (by table, e.g.
# SP_RULES[catentry]='key = { rule = "allocate", sequence = "public.s" }'), and whole extra
# sections (e.g. [spool]) from SP_EXTRA; the target's database is SP_PRODUCTION_DB (default shop),
# logged in to as SP_PRODUCTION_USER (default postgres).
declare -A SP_RULES=()
write_sp_config() {
    local file=$1 target=$2 slot=$3 table
    shift 3
    {
        printf '[staging]\nurl = "host=127.0.0.1 port=%s dbname=shop user=postgres"\nsslmode = "disable"\n\n' "${PORT[${SP_STAGING:-staging}]}"
        printf '[production]\nurl = "host=127.0.0.1 port=%s dbname=%s user=%s"\nsslmode = "disable"\n\n' "${PORT[$target]}" "${SP_PRODUCTION_DB:-shop}" "${SP_PRODUCTION_USER:-postgres}"
        printf '[sync]\nslot = "%s"\npublication = "stagingprop"\n' "$slot"
        if [[ -n ${SP_SYNC:-} ]]; then tr ';' '\n' <<<"$SP_SYNC"; fi
        for table in "$@"; do
            printf '\n[[tables]]\nname = "public.%s"\n' "$table"
            if [[ -n ${SP_RULES[$table]:-} ]]; then printf '%s\n' "${SP_RULES[$table]}"; fi
        done
        if [[ -n ${SP_EXTRA:-} ]]; then printf '\n%s\n' "$SP_EXTRA"; fi
    } >"$file"
}
