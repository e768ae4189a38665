#!/usr/bin/env bash
# The README's first command: builds the wordcount plugins (Wasm components)
# and the host, then shows what Weir is for, embedded (no server, no
# services): a stream of words is counted with checkpoints, stopped with a
# savepoint, and resumed with the upgraded `count` v2 (its state migrated
# from v1, at another parallelism), and every word's count carries on. Then
# the same upgrade on a running host (`weir serve` on a free loopback port,
# a throwaway data dir): plugins added to its store, the job submitted, and
# `count` upgraded while it runs, printing the downtime.
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
rm -rf out-stream out-host weir-data/savepoints

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

# Checks that every word's updates in the sink directory $1 run 1..N with
# no gap and no repeat (exactly-once across stops and upgrades).
check_exactly_once() {
    awk '
        { n[$1]++; if ($2 > max[$1]) max[$1] = $2; if (seen[$1, $2]++) dup++ ; total++ }
        END {
            for (w in n) { words++; if (n[w] != max[w]) gaps++ }
            printf "%d updates of %d words; every count runs 1..N with no gap (%d gaps) and no repeat (%d repeats)\n", total, words, gaps + 0, dup + 0
            exit (gaps + dup > 0)
        }' "$1"/part-*
}

echo "==> every word's updates, across the stop and the upgrade (from out-stream/):" >&2
check_exactly_once out-stream
echo "==> the most frequent words" >&2
awk '$2 > count[$1] { count[$1] = $2 } END { for (w in count) print count[w], w }' out-stream/part-* \
    | sort -k1,1nr -k2 | head -n 5

echo "==> 3. the same upgrade on a running host: weir serve, a throwaway data dir" >&2
host_data="$(mktemp -d)"
"$weir" serve --listen 127.0.0.1:0 --data-dir "$host_data/data" --root "$PWD" >"$host_data/serve.out" 2>"$host_data/serve.log" &
host=$!
trap 'kill "$host" 2>/dev/null; wait "$host" 2>/dev/null; rm -rf "$host_data"' EXIT
for _ in $(seq 100); do
    grep -q '^listening on ' "$host_data/serve.out" && break
    sleep 0.1
done
WEIR_HOST="$(sed -n 's/^listening on //p' "$host_data/serve.out")"
[ -n "$WEIR_HOST" ] || { cat "$host_data/serve.log" >&2; exit 1; }
export WEIR_HOST
echo "==> the host listens on $WEIR_HOST; its dashboard: $WEIR_HOST/ (until the demo ends)" >&2

# Waits until the host's job $1 completed $2 checkpoints in its current run.
wait_for_checkpoints() {
    local done=0
    for _ in $(seq 150); do
        done="$("$weir" job "$1" | sed -n 's/^checkpoints  \([0-9]*\) completed.*/\1/p')"
        [ "${done:-0}" -ge "$2" ] && return 0
        sleep 0.2
    done
    echo "demo: job $1 completed ${done:-0} of $2 checkpoints in 30 s" >&2
    exit 1
}

echo "==> weir plugin add: validated, precompiled, stored by name@version" >&2
"$weir" plugin add plugins/split.wasm plugins/count.wasm plugins/count-v2.wasm
echo "==> weir run stream-host.toml (count@0.1.0) on the host" >&2
job="$("$weir" run stream-host.toml)"
wait_for_checkpoints "$job" 3
echo "==> weir upgrade $job --plugin count=count@0.2.0, while it runs" >&2
"$weir" upgrade "$job" --plugin count=count@0.2.0 >/dev/null
wait_for_checkpoints "$job" 2
echo "==> weir stop $job (with a savepoint)" >&2
"$weir" stop "$job" >/dev/null
echo "==> every word's updates, across the live upgrade (from out-host/):" >&2
check_exactly_once out-host
