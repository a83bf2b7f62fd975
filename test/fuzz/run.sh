#!/usr/bin/env bash
# test/fuzz/run.sh SECONDS BUILD_DIR NAME...: runs each harness BUILD_DIR/NAME for SECONDS on its
# seed corpus (test/fuzz/corpus/NAME, read only: new inputs go to BUILD_DIR/corpus/NAME), one after
# another, and prints one line each:
#   fuzz NAME: RUNS runs, CRASHES crashes
# RUNS is libFuzzer's count of executed inputs (stat::number_of_executed_units, or its last "#N"
# status line when a crash cut the run short); CRASHES counts the inputs it saved as crash-, leak-,
# timeout- or oom- files (libFuzzer stops at the first). The log of each run is BUILD_DIR/NAME.log.
# Exits 1 when any harness crashed, naming the input to turn into a regression test.
set -u
seconds=$1 build=$2
shift 2
failed=0
for name in "$@"; do
    work=$build/corpus/$name art=$build/artifacts/$name/ log=$build/$name.log
    mkdir -p "$work" "$art"
    rm -f "$art"/*
    "$build/$name" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$art" "$work" "test/fuzz/corpus/$name" >"$log" 2>&1
    status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$runs" ] || runs=$(sed -n 's/^#\([0-9][0-9]*\).*/\1/p' "$log" | tail -1)
    crashes=$(find "$art" -type f | wc -l)
    [ $status -ne 0 ] && [ "$crashes" -eq 0 ] && crashes=1  # died without saving an input
    echo "fuzz $name: ${runs:-0} runs, $crashes crashes"
    if [ "$crashes" -ne 0 ]; then
        failed=1
        find "$art" -type f | sed 's/^/    crashing input: /'
        grep -m3 -E 'ERROR|FUZZ_ASSERT|runtime error' "$log" | sed 's/^/    /'
    fi
done
exit $failed
