#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ on the stable toolchain (libFuzzer from the libfuzzer-sys
# crate, LLVM's SanitizerCoverage instrumentation through stable -C flags; no nightly and no
# cargo-fuzz needed) and runs them over the corpus kept in fuzz/corpus/<target>/.
#
#   scripts/fuzz.sh smoke [SECONDS]     every target for SECONDS (default 10) each: CI's run
#   scripts/fuzz.sh run TARGET RUNS     one target for RUNS executions (e.g. 10000000), growing
#                                       the corpus; crashes land in fuzz/artifacts/TARGET/
#   scripts/fuzz.sh minimize TARGET     shrinks TARGET's corpus to the inputs that add coverage
#   scripts/fuzz.sh seeds               rewrites the seed inputs (fuzz/src/seeds.rs)
#   scripts/fuzz.sh build               builds only
#
# Targets: pgoutput_decode backend_messages spool_records copy_rewrite config_parse.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

TARGETS=(pgoutput_decode backend_messages spool_records copy_rewrite config_parse)
# --cfg fuzzing is what cargo-fuzz sets too; the sancov flags are those cargo-fuzz passes for
# libFuzzer's coverage feedback (edge counters, the PC table, comparison operands).
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_FUZZ:-$PWD/target}"
# With an explicit --target, RUSTFLAGS reach only the target's code, not build scripts and
# proc-macros (which would otherwise need libFuzzer's symbols to link).
HOST=$(rustc -vV | sed -n 's/^host: //p')
BIN="$CARGO_TARGET_DIR/$HOST/release"

build() {
    local bins=() name
    for name in "${TARGETS[@]}"; do bins+=(--bin "$name"); done
    cargo build --release --quiet --target "$HOST" "${bins[@]}"
}

run_target() { # target, then libFuzzer options
    local target=$1
    shift
    mkdir -p "corpus/$target" "artifacts/$target"
    # Inputs over 64 KiB add nothing the smaller ones do not, and slow every execution.
    "$BIN/$target" "corpus/$target" -artifact_prefix="artifacts/$target/" -max_len=65536 \
        -print_final_stats=1 "$@"
}

case "${1:-smoke}" in
build) build ;;
seeds)
    # An ordinary build: the generator is not a fuzz target and has no libFuzzer to link.
    RUSTFLAGS="" cargo run --quiet --bin seeds
    ;;
smoke)
    seconds=${2:-10}
    build
    for target in "${TARGETS[@]}"; do
        echo "fuzz: $target for $seconds s"
        # A copy of the corpus, so a smoke run leaves the kept one as it is.
        scratch=$(mktemp -d)
        cp -r "corpus/$target/." "$scratch/"
        mkdir -p "artifacts/$target"
        status=0
        "$BIN/$target" "$scratch" -artifact_prefix="artifacts/$target/" -max_len=65536 \
            -max_total_time="$seconds" -print_final_stats=1 >"$scratch.log" 2>&1 || status=$?
        grep -E "^stat::number_of_executed_units" "$scratch.log" || true
        rm -rf "$scratch"
        if [ "$status" -ne 0 ]; then
            tail -40 "$scratch.log" >&2
            echo "fuzz: $target failed (exit $status); the input is in fuzz/artifacts/$target/" >&2
            exit 1
        fi
        rm -f "$scratch.log"
    done
    ;;
run)
    target=${2:?target}
    runs=${3:?runs}
    build
    run_target "$target" -runs="$runs"
    ;;
minimize)
    target=${2:?target}
    build
    kept=$(mktemp -d)
    "$BIN/$target" -merge=1 -max_len=65536 "$kept" "corpus/$target"
    rm -rf "corpus/$target"
    mv "$kept" "corpus/$target"
    echo "corpus/$target: $(ls "corpus/$target" | wc -l) inputs"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
