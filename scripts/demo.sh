#!/usr/bin/env bash
# The README's first command: builds the wordcount plugins (Wasm components)
# and the host, then shows what Weir is for, embedded (no server, no
# services): a stream of words is counted with checkpoints, stopped with a
# savepoint, and resumed with the upgraded `count` v2 (its state migrated
# from v1, at another parallelism), and every word's count carries on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "==> building the plugins (wasm32-wasip2 components)" >&2
cargo build --release --target wasm32-wasip2 --target-dir target/guests \
    -p wordcount-split -p wordcount-count -p wordcount-count-v2
mkdir -p examples/wordcount/plugins
cp target/guests/wasm32-wasip2/release/wordcount_split.wasm examples/wordcount/plugins/split.wasm
cp target/guests/wasm32-wasip2/release/wordcount_count.wasm examples/wordcount/plugins/count.wasm
cp target/guests/wasm32-wasip2/release/wordcount_count_v2.wasm examples/wordcount/plugins/count-v2.wasm

echo "==> building the host" >&2
cargo build -p weir
weir="$PWD/target/debug/weir"
cd examples/wordcount
rm -rf out-stream weir-data/savepoints

# Runs a job file for a few seconds, then stops it with a savepoint
# (SIGTERM, as a deployment would); prints the savepoint's path.
run_and_stop() {
    local seconds="$1"
    shift
    "$weir" run "$@" --savepoint-dir weir-data/savepoints --quiet > weir-data/savepoint.txt &
    local pid=$!
    sleep "$seconds"
    kill -TERM "$pid"
    wait "$pid"
    cat weir-data/savepoint.txt
}

mkdir -p weir-data
echo "==> 1. stream.toml: count v1, checkpoints every second; stopped with a savepoint after 4 s" >&2
first=$(run_and_stop 4 stream.toml)
echo "==> 2. stream-v2.toml: resumed from $first with count v2 (state migrated, parallelism 2 -> 3)" >&2
second=$(run_and_stop 4 stream-v2.toml -s "$first")
echo "==> stopped again: $second" >&2

echo "==> every word's updates, across the stop and the upgrade (from out-stream/):" >&2
awk '
    { n[$1]++; if ($2 > max[$1]) max[$1] = $2; if (seen[$1, $2]++) dup++ ; total++ }
    END {
        for (w in n) { words++; if (n[w] != max[w]) gaps++ }
        printf "%d updates of %d words; every count runs 1..N with no gap (%d gaps) and no repeat (%d repeats)\n", total, words, gaps + 0, dup + 0
        exit (gaps + dup > 0)
    }' out-stream/part-*
echo "==> the most frequent words" >&2
awk '$2 > count[$1] { count[$1] = $2 } END { for (w in count) print count[w], w }' out-stream/part-* \
    | sort -k1,1nr -k2 | head -n 5
