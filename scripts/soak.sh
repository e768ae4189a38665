#!/usr/bin/env bash
# A soak of the running host (not in CI): one `weir serve`, three jobs,
# upgrades every five minutes, sampled every 10 s.
#
#   bash scripts/soak.sh [DURATION] [OUT_DIR]     # default: 1h, target/soak/<timestamp>/
#   SOAK_UPGRADE_EVERY=1m bash scripts/soak.sh 6m  # a short check of the script itself
#
# DURATION and SOAK_UPGRADE_EVERY take 90s, 6m, 1h or plain seconds.
#
# It builds the release host and the wordcount plugins (and the C `count`,
# installing its Debian toolchain through examples/c-count/build.sh, and
# gnuplot-nox for the plot), starts a host on a free loopback port whose
# data dir and job roots are OUT_DIR, adds the plugins and submits three
# word-count jobs (generator → split → count → exactly-once file sink,
# a checkpoint every second), each at another rate, key count and
# parallelism:
#
#   soak-a  2,000 words/s over    200 words, split p1, count p2
#   soak-b  3,000 words/s over  2,000 words, split p1, count p3
#   soak-c  4,000 words/s over 20,000 words, split p2, count p2
#
# Every SOAK_UPGRADE_EVERY (default 5m) it upgrades each job in turn.
# count 0.1.0 ⇄ 0.2.0 back and forth is not possible: 0.2.0 stores a
# struct (state schema 2), 0.1.0 reads only its own u64 (schema 1) and
# exports no migration, so the host refuses 0.2.0 → 0.1.0 at its check.
# Instead each job takes one kind of upgrade over and over, so that every
# path of the upgrade procedure is soaked and each job's series stays
# readable:
#
#   soak-a  a plugin swap, no migration (a prepared native savepoint):
#           count@0.1.0 (Rust) ⇄ count@0.1.0-c (examples/c-count), which
#           store the same state (schema 1, the count as JSON digits).
#   soak-b  round 1: count@0.1.0 → count@0.2.0, which migrates the state
#           (a standby restores and migrates it while v1 runs on, then an
#           incremental savepoint); later rounds rescale count 4 ⇄ 2.
#   soak-c  a new job file each round: round 1 c-2.toml (count@0.2.0 at
#           p3, split p1: a migration and a rescale at once, so no standby
#           can follow and the state migrates while the job is down), then
#           c-3.toml (count@0.2.0 at p2, split p2) ⇄ c-2.toml.
#
# OUT_DIR/soak.csv gets a row every 10 s: elapsed seconds, the host's RSS
# (kB, VmRSS), open file descriptors, threads, the bytes under the data
# dir's checkpoints/, savepoints/ and state/, and per job its status, the
# checkpoints its current run completed, its newest checkpoint's id (ids
# grow across runs) and size, the records its sink took in (current run)
# and its restarts. OUT_DIR/upgrades.csv gets a row per upgrade: when it
# started, the outcome and downtime the host recorded, how long the
# command took, and what it changed. At the end the jobs are stopped
# (`weir stop`), every job's committed output is checked to be
# exactly-once (every word's updates run 1..N, no gap, no repeat), the
# host is stopped, OUT_DIR/soak.png is drawn (RSS; fds and threads; the
# data dir's bytes; each job's newest checkpoint size; over time, upgrades
# marked) and a summary printed (and kept in OUT_DIR/summary.txt).
# savepoints/ only grows: every upgrade goes through a savepoint, and the
# host never deletes one. Exit status 1 if an upgrade did not complete, a
# job failed or restarted, or the output is not exactly-once.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

# 90s, 6m, 1h or plain seconds → seconds.
seconds() {
    case "$1" in
        *h) echo $((${1%h} * 3600)) ;;
        *m) echo $((${1%m} * 60)) ;;
        *s) echo $((${1%s})) ;;
        *[!0-9]* | "")
            echo "soak: duration '$1' is not like 90s, 6m, 1h or a number of seconds" >&2
            return 1
            ;;
        *) echo $(($1)) ;;
    esac
}
duration=$(seconds "${1:-1h}")
every=$(seconds "${SOAK_UPGRADE_EVERY:-5m}")
if ((every <= 0 || duration <= 0)); then
    echo "soak: DURATION and SOAK_UPGRADE_EVERY must be positive" >&2
    exit 2
fi
out="${2:-target/soak/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -n "$(ls -A "$out")" ]; then
    echo "soak: $out is not empty; give a new OUT_DIR" >&2
    exit 2
fi
mkdir -p "$out/plugins" "$out/jobs" "$out/logs" "$out/tmp"

say() { echo "==> $*" >&2; }

# --- what it needs ---------------------------------------------------------
bash scripts/setup.sh
if ! command -v gnuplot >/dev/null; then
    say "installing gnuplot-nox (apt-get) for the plot"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null
fi
# SOAK_PROFILE=bench reuses a benchmark build's dependencies (same code,
# line tables kept); both profiles put the binary under release/.
profile="${SOAK_PROFILE:-release}"
say "building the host ($profile profile)"
cargo build --profile "$profile" -p weir
weir="${CARGO_TARGET_DIR:-$repo/target}/release/weir"
say "building the plugins (wasm32-wasip2 components)"
cargo build --release --target wasm32-wasip2 --target-dir target/guests \
    -p wordcount-split -p wordcount-count -p wordcount-count-v2
for plugin in split count count_v2; do
    cp "target/guests/wasm32-wasip2/release/wordcount_$plugin.wasm" "$out/plugins/${plugin/_/-}.wasm"
done
WEIR="$weir" bash examples/c-count/build.sh "$out/plugins/count-c.wasm"

# --- the host ----------------------------------------------------------------
cat >"$out/host.toml" <<EOF
listen = "127.0.0.1:0"
data_dir = "$out/data"

[jobs]
roots = ["$out"]
EOF
say "starting weir serve (data dir $out/data, log $out/logs/serve.log)"
"$weir" -v serve --config "$out/host.toml" >"$out/logs/serve.out" 2>"$out/logs/serve.log" &
host_pid=$!
sampler_pid=""
host_stopped=""
cleanup() {
    if [ -n "$sampler_pid" ] && kill -0 "$sampler_pid" 2>/dev/null; then
        kill "$sampler_pid" 2>/dev/null || true
    fi
    if [ -z "$host_stopped" ] && ! kill -0 "$host_pid" 2>/dev/null; then
        echo "soak: weir serve (pid $host_pid) is gone; its log: $out/logs/serve.log" >&2
    elif kill -0 "$host_pid" 2>/dev/null; then
        kill -TERM "$host_pid" 2>/dev/null || true
        wait "$host_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
for _ in $(seq 600); do
    grep -q '^listening on ' "$out/logs/serve.out" 2>/dev/null && break
    if ! kill -0 "$host_pid" 2>/dev/null; then
        echo "soak: weir serve exited at start:" >&2
        cat "$out/logs/serve.log" >&2
        exit 1
    fi
    sleep 0.1
done
WEIR_HOST="$(sed -n 's/^listening on //p' "$out/logs/serve.out")"
if [ -z "$WEIR_HOST" ]; then
    echo "soak: weir serve did not say where it listens within 60 s (log: $out/logs/serve.log)" >&2
    exit 1
fi
export WEIR_HOST
say "host at $WEIR_HOST (pid $host_pid)"
"$weir" plugin add "$out"/plugins/{split,count,count-v2,count-c}.wasm

# --- the jobs ----------------------------------------------------------------
# job_file FILE NAME RATE KEYS SEED SPLIT_P COUNT_PLUGIN COUNT_P
job_file() {
    cat >"$1" <<EOF
# soak job $2 (written by scripts/soak.sh)
name = "$2"
max_parallelism = 128

[checkpoint]
interval = "1s"

[[source]]
uid = "words"
kind = "generator"
rate = $3
keys = $4
seed = $5

[[operator]]
uid = "split"
plugin = "split"
inputs = ["words"]
parallelism = $6

[[operator]]
uid = "count"
plugin = "$7"
inputs = [{ from = "split", partition = "key" }]
parallelism = $8

[[sink]]
uid = "out"
kind = "file"
path = "$out/out/$2/"
inputs = ["count"]
EOF
}
job_file "$out/jobs/a.toml" soak-a 2000 200 1 1 count@0.1.0 2
job_file "$out/jobs/b.toml" soak-b 3000 2000 2 1 count@0.1.0 3
job_file "$out/jobs/c.toml" soak-c 4000 20000 3 2 count@0.1.0 2
job_file "$out/jobs/c-2.toml" soak-c 4000 20000 3 1 count@0.2.0 3
job_file "$out/jobs/c-3.toml" soak-c 4000 20000 3 2 count@0.2.0 2

jobs=(a b c)
declare -A id
for job in "${jobs[@]}"; do
    id[$job]="$("$weir" run "$out/jobs/$job.toml")"
done

detail() { curl -sf "$WEIR_HOST/api/jobs/$1"; }

for job in "${jobs[@]}"; do
    for _ in $(seq 120); do
        [ "$(detail "${id[$job]}" | jq -r '.checkpoints_completed')" -gt 0 ] 2>/dev/null && break
        sleep 1
    done
    status="$(detail "${id[$job]}" | jq -r '"\(.job.lifecycle.status) after \(.checkpoints_completed) checkpoints"')"
    say "soak-$job (${id[$job]}): $status"
    if [[ "$status" != running* || "$status" == *" 0 checkpoints" ]]; then
        echo "soak: soak-$job is not running with a checkpoint within 120 s: $status" >&2
        exit 1
    fi
done

# --- sampling -------------------------------------------------------------------
t0=$(date +%s)
elapsed() { echo $(($(date +%s) - t0)); }
bytes_of() {
    local bytes
    bytes="$(du -sb "$1" 2>/dev/null | cut -f1)" || true # files vanish while du reads
    echo "${bytes:-0}"
}
header="elapsed_s,rss_kb,fds,threads,checkpoints_bytes,savepoints_bytes,state_bytes"
for job in "${jobs[@]}"; do
    for column in status checkpoints last_checkpoint checkpoint_bytes records_out restarts; do
        header+=",${job}_$column"
    done
done
echo "$header" >"$out/soak.csv"
sample() {
    local row
    row="$(elapsed),$(awk '/^VmRSS:/ { print $2 }' "/proc/$host_pid/status")"
    row+=",$(find "/proc/$host_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)"
    row+=",$(awk '/^Threads:/ { print $2 }' "/proc/$host_pid/status")"
    for dir in checkpoints savepoints state; do
        row+=",$(bytes_of "$out/data/$dir")"
    done
    for job in "${jobs[@]}"; do
        row+=",$(detail "${id[$job]}" | jq -r '[
            .job.lifecycle.status,
            .checkpoints_completed,
            (.checkpoints | last | .id // ""),
            (.checkpoints | last | .bytes // ""),
            ([.operators[] | select(.role == "sink") | .records_in] | add // 0),
            (.job.restarts | length)
        ] | map(tostring) | join(",")' || echo "unreachable,,,,,")"
    done
    echo "$row" >>"$out/soak.csv"
}
sampler() {
    local next=0 wait
    while kill -0 "$host_pid" 2>/dev/null; do
        sample
        next=$((next + 10))
        wait=$((t0 + next - $(date +%s)))
        if ((wait > 0)); then sleep "$wait"; fi
    done
}
sampler &
sampler_pid=$!

# Sleeps until `elapsed` reaches $1, checking that the host still runs.
sleep_until() {
    while (($(elapsed) < $1)); do
        kill -0 "$host_pid" 2>/dev/null || exit 1 # cleanup says so
        local left=$(($1 - $(elapsed)))
        sleep $((left < 5 ? left : 5))
    done
}

# --- upgrades -------------------------------------------------------------------
echo "elapsed_s,round,job,outcome,downtime_ms,seconds,exit_code,change,standby,error" >"$out/upgrades.csv"
# The upgrade job $1 takes in round $2: sets `change` to its `weir
# upgrade` arguments.
upgrade_args() {
    local job="$1" round="$2"
    case "$job" in
        a) if ((round % 2)); then change=(--plugin count=count@0.1.0-c); else change=(--plugin count=count@0.1.0); fi ;;
        b) if ((round == 1)); then
            change=(--plugin count=count@0.2.0)
        elif ((round % 2)); then
            change=(--parallelism count=2)
        else
            change=(--parallelism count=4)
        fi ;;
        c) if ((round % 2)); then change=(--job-file "$out/jobs/c-2.toml"); else change=(--job-file "$out/jobs/c-3.toml"); fi ;;
    esac
}
upgrade() {
    local job="$1" round="$2" job_id="${id[$1]}" started before began took code=0 change
    local log="$out/logs/upgrade-$round-$job.txt"
    upgrade_args "$job" "$round"
    started=$(elapsed)
    before="$(detail "$job_id" | jq '.job.upgrades | length')"
    began=$EPOCHREALTIME
    # An upgrade takes seconds; one still going after 15 min is a hang.
    timeout 900 "$weir" upgrade "$job_id" "${change[@]}" >"$log" 2>&1 || code=$?
    took="$(awk -v a="$began" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    # The host's record of it; none if the request itself was refused.
    detail "$job_id" | jq -r --argjson before "$before" --arg started "$started" \
        --arg round "$round" --arg job "soak-$job" --arg took "$took" --arg code "$code" \
        --arg change "${change[*]}" --arg cli "$(tail -n 1 "$log")" '
        (if (.job.upgrades | length) > $before then .job.upgrades[-1]
         else { outcome: "not-accepted", change: $change, error: $cli } end) as $u
        | "\($started),\($round),\($job),\($u.outcome),\(if $u.downtime_ms then $u.downtime_ms * 10 | round / 10 else "" end),\($took),\($code),"
          + ([$u.change, ($u.standby // ""), ($u.error // "")] | @csv)' >>"$out/upgrades.csv"
    say "round $round, soak-$job, ${change[*]}: $(tail -n 1 "$out/upgrades.csv")"
}

say "soaking for ${duration}s, upgrades every ${every}s; $out/soak.csv"
round=0
for ((at = every; at < duration; at += every)); do
    sleep_until "$at"
    round=$((round + 1))
    for job in "${jobs[@]}"; do
        upgrade "$job" "$round"
    done
done
sleep_until "$duration"
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sample

# --- the end: stop, check, plot, summarise -----------------------------------------
failures=()
for job in "${jobs[@]}"; do
    if ! timeout 300 "$weir" stop "${id[$job]}" >"$out/logs/stop-$job.txt" 2>&1; then
        failures+=("soak-$job: weir stop failed: $(tail -n 1 "$out/logs/stop-$job.txt")")
    fi
    final="$(detail "${id[$job]}" | jq -r '"\(.job.lifecycle.status) \(.job.restarts | length)"')"
    read -r status restarts <<<"$final"
    [ "$status" = stopped ] || failures+=("soak-$job ended $status, not stopped")
    ((restarts == 0)) || failures+=("soak-$job restarted $restarts times (see weir job ${id[$job]})")
done

# Every word's updates, sorted, must run 1, 2, … N: a count below the one
# expected is a repeat, above it a gap.
exactly_once() {
    find "$out/out/$1" -maxdepth 1 -type f -name 'part-*' -print0 \
        | xargs -0 -r cat \
        | LC_ALL=C sort -k1,1 -k2,2n -S 1G -T "$out/tmp" \
        | awk '
            $1 != word { word = $1; expect = 1; words++ }
            { total++; if ($2 == expect) expect++; else if ($2 < expect) repeats++; else { gaps++; expect = $2 + 1 } }
            END {
                printf "%d updates of %d words, %d gaps, %d repeats", total, words, gaps, repeats
                exit (total == 0 || gaps + repeats > 0)
            }'
}
verdicts=()
for job in "${jobs[@]}"; do
    if verdict="$(exactly_once "soak-$job")"; then
        verdicts+=("soak-$job: exactly-once ($verdict)")
    else
        verdicts+=("soak-$job: NOT exactly-once ($verdict)")
        failures+=("soak-$job output is not exactly-once: $verdict")
    fi
done

not_done="$(awk -F, 'NR > 1 && $4 != "upgraded"' "$out/upgrades.csv" | wc -l)"
((not_done == 0)) || failures+=("$not_done upgrades did not complete (upgrades.csv, logs/upgrade-*)")

say "stopping the host"
host_stopped=yes
kill -TERM "$host_pid"
wait "$host_pid" || failures+=("weir serve exited with status $? at shutdown (log: $out/logs/serve.log)")

# upgrades.csv → one vertical line per upgrade (grey: upgraded, red: not).
markers="$(awk -F, 'NR > 1 {
        colour = ($4 == "upgraded") ? "#999999" : "#dd0000"
        printf "set arrow from %f, graph 0 to %f, graph 1 nohead lc rgb \"%s\" dt 2\n", $1 / 60, $1 / 60, colour
    }' "$out/upgrades.csv")"
gnuplot <<EOF
set terminal pngcairo size 1200,1400 font ",10"
set output "$out/soak.png"
set datafile separator ","
set key top left
set grid
set xrange [0:$duration / 60.0]
set multiplot layout 4,1 title "weir serve soak: 3 jobs, upgrades every ${every} s (dashed; red: one that did not complete), $(basename "$out")"
$markers
set ylabel "MiB"
plot "$out/soak.csv" skip 1 using (\$1/60):(\$2/1024) with lines lw 2 title "host RSS"
set ylabel "count"
plot "$out/soak.csv" skip 1 using (\$1/60):3 with lines lw 2 title "open file descriptors", \
     "" skip 1 using (\$1/60):4 with lines lw 2 title "threads"
set ylabel "MiB"
plot "$out/soak.csv" skip 1 using (\$1/60):(\$5/1048576) with lines lw 2 title "data dir: checkpoints/", \
     "" skip 1 using (\$1/60):(\$6/1048576) with lines lw 2 title "savepoints/", \
     "" skip 1 using (\$1/60):(\$7/1048576) with lines lw 2 title "state/"
set ylabel "KiB"
set xlabel "minutes"
plot "$out/soak.csv" skip 1 using (\$1/60):(\$11/1024) with lines lw 2 title "newest checkpoint: soak-a", \
     "" skip 1 using (\$1/60):(\$17/1024) with lines lw 2 title "soak-b", \
     "" skip 1 using (\$1/60):(\$23/1024) with lines lw 2 title "soak-c"
unset multiplot
EOF

{
    echo "soak of ${duration}s, upgrades every ${every}s: $out"
    awk -F, 'NR > 1 {
            for (c = 2; c <= 5; c++) { v = $c + 0; if (NR == 2) first[c] = v; if (v > max[c]) max[c] = v; last[c] = v }
        }
        END {
            printf "RSS               start %7.1f MiB   max %7.1f MiB   end %7.1f MiB\n", first[2] / 1024, max[2] / 1024, last[2] / 1024
            printf "open fds          start %7d       max %7d       end %7d\n", first[3], max[3], last[3]
            printf "threads           start %7d       max %7d       end %7d\n", first[4], max[4], last[4]
            printf "checkpoints/      start %7.1f MiB   max %7.1f MiB   end %7.1f MiB\n", first[5] / 1048576, max[5] / 1048576, last[5] / 1048576
        }' "$out/soak.csv"
    awk -F, 'NR > 1 { n++; outcome[$4]++ }
        END {
            printf "upgrades          %d: %d upgraded, %d rolled back, %d other\n", n, outcome["upgraded"], outcome["rolled-back"], n - outcome["upgraded"] - outcome["rolled-back"]
        }' "$out/upgrades.csv"
    awk -F, 'NR > 1 && $5 != "" { print $5 }' "$out/upgrades.csv" | sort -n | awk '
        { d[NR] = $1 }
        END { if (NR) printf "downtime          min %.0f ms, median %.0f ms, max %.0f ms\n", d[1], d[int((NR + 1) / 2)], d[NR] }'
    printf '%s\n' "${verdicts[@]}"
    if ((${#failures[@]})); then
        echo "FAILED:"
        printf '  %s\n' "${failures[@]}"
    else
        echo "every upgrade done, no job failed or restarted, every output exactly-once"
    fi
    echo "files: soak.csv, upgrades.csv, soak.png, logs/"
} | tee "$out/summary.txt"
((${#failures[@]} == 0))
