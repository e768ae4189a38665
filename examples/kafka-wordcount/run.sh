#!/usr/bin/env bash
# The Kafka word count end to end on this machine: builds the plugins and
# the host (as scripts/demo.sh does), starts a Kafka-protocol broker on
# 127.0.0.1:9092 (noida-db 0.2.3, installed by scripts/kafka.sh with the
# confluent-kafka client), creates the topics, produces
# ../wordcount/input.txt onto 4 partitions, runs job.toml to the end of
# the input and shows what a read_committed consumer sees in the output
# topic. The broker is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
bash scripts/setup.sh
cargo build --release --target wasm32-wasip2 --target-dir target/guests \
    -p wordcount-split -p wordcount-count
mkdir -p examples/wordcount/plugins
cp target/guests/wasm32-wasip2/release/wordcount_split.wasm examples/wordcount/plugins/split.wasm
cp target/guests/wasm32-wasip2/release/wordcount_count.wasm examples/wordcount/plugins/count.wasm
cargo build -p weir
broker="$(bash scripts/kafka.sh)"
store="$(mktemp -d)"
# shellcheck disable=SC2046
"$broker" $(bash scripts/kafka.sh --args 9092 "$store") >"$store/broker.log" 2>&1 &
broker_pid=$!
trap 'kill $broker_pid 2>/dev/null; wait $broker_pid 2>/dev/null; rm -rf "$store"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && break; sleep 0.1; done

client() { PYTHONPATH="$root/target/tools/kafka/client" python3 "$root/tests/kafka_client.py" "$@"; }
client create 127.0.0.1:9092 wordcount-in 4
client create 127.0.0.1:9092 wordcount-out 2
python3 -c '
import json, sys
for i, line in enumerate(open(sys.argv[1])):
    print(json.dumps({"partition": i % 4, "key": None, "value": line.rstrip("\n")}))
' examples/wordcount/input.txt | client produce 127.0.0.1:9092 wordcount-in

cd examples/kafka-wordcount
rm -rf weir-data
"$root/target/debug/weir" run job.toml
echo "the most frequent words (read_committed from wordcount-out):"
client read 127.0.0.1:9092 wordcount-out | python3 -c '
import json, sys
final = {}
for line in sys.stdin:
    word, count = json.loads(line)["value"].rsplit(" ", 1)
    final[word] = max(final.get(word, 0), int(count))
for word, count in sorted(final.items(), key=lambda kv: -kv[1])[:10]:
    print(f"  {count:6}  {word}")
'
