#!/usr/bin/env bash
# A Weir cluster on this machine, end to end: builds the plugins and the
# host, starts three NATS nodes with routes (JetStream clustered, ports
# 4222-4224; nats-server installed by scripts/nats.sh), SeaweedFS as the
# S3 server (127.0.0.1:8333, scripts/seaweedfs.sh) and three `weir serve`
# hosts in one cluster (APIs on 127.0.0.1:8081-8083); publishes 60000
# lines, submits job.toml, shows where its stages' tasks run, SIGKILLs
# the host of the `count` stage's first task, shows that task carry on
# elsewhere from its checkpoint while the others run on, and checks at the end that every
# count was published exactly once. Everything is stopped at the end.
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
weir="$root/target/debug/weir"
nats_server="$(bash scripts/nats.sh)"
if [ ! -d target/tools/nats-py/nats ]; then
    echo "==> installing the nats-py client into target/tools/nats-py" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target target/tools/nats-py "nats-py==2.16.0" >&2
fi
weed="$(bash scripts/seaweedfs.sh)"
store="$(mktemp -d)"
pids=()
host_pids=()
cleanup() {
    for pid in "${host_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${host_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$store"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "nothing listens on $1" >&2; return 1; }

echo "==> three NATS nodes (JetStream clustered), SeaweedFS"
for i in 0 1 2; do
    routes="$(for j in 0 1 2; do [ "$j" = "$i" ] || printf 'nats://127.0.0.1:%s,' $((6222 + j)); done)"
    "$nats_server" -js -a 127.0.0.1 -p $((4222 + i)) -n "node-$i" -sd "$store/nats-$i" \
        --cluster_name weir-example --cluster "nats://127.0.0.1:$((6222 + i))" \
        --routes "${routes%,}" >"$store/nats-$i.log" 2>&1 &
    pids+=($!)
done
export AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=weir-example AWS_SECRET_ACCESS_KEY=weir-example-secret
mkdir -p "$store/s3"
cat >"$store/s3.json" <<JSON
{"identities":[{"name":"weir","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
"$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$store/s3" -s3 -s3.port=8333 \
    -s3.config="$store/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.volumeSizeLimitMB=64 >"$store/weed.log" 2>&1 &
pids+=($!)
for port in 4222 4223 4224; do wait_port "$port" || exit 1; done
s3() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$@"; }
for _ in $(seq 120); do s3 -X PUT "$AWS_ENDPOINT_URL/weir-example" >/dev/null 2>&1 && break; sleep 0.5; done

urls="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
streams() { PYTHONPATH="$root/target/tools/nats-py" python3 examples/cluster/streams.py "$urls" "$@"; }
# JetStream places replicated streams once its three nodes elected a leader.
for _ in $(seq 60); do streams create 2>/dev/null && break; sleep 1; done
streams publish 60000

echo "==> three weir serve hosts of cluster \`example\`"
cat >"$store/host.toml" <<TOML
[cluster]
nats = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]
name = "example"
s3 = "s3://weir-example/cluster"
replicas = 3
TOML
for i in 0 1 2; do
    "$weir" serve --listen "127.0.0.1:$((8081 + i))" --data-dir "$store/host-$i" \
        --config "$store/host.toml" >"$store/host-$i.out" 2>"$store/host-$i.log" &
    host_pids+=($!)
    wait_port $((8081 + i)) || { tail -20 "$store/host-$i.log" >&2; exit 1; }
done
export WEIR_HOST=http://127.0.0.1:8081
until [ "$("$weir" hosts --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["hosts"]))')" = 3 ]; do
    sleep 0.2
done
"$weir" hosts

echo "==> weir run examples/cluster/job.toml"
id="$("$weir" run examples/cluster/job.toml)"
for _ in $(seq 100); do
    "$weir" job "$id" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["stages"] and all(s["host"] and s["status"]=="running" for s in d["stages"]) else 1)' && break
    sleep 0.2
done
sleep 5
"$weir" job "$id" | grep -E '^(stage|checkpoints)'

# The host of the `count` stage's first task, and its process.
victim="$("$weir" job "$id" --json | python3 -c 'import json,sys; print(next(s["host"] for s in json.load(sys.stdin)["stages"] if s["name"]=="count"))')"
api="$("$weir" hosts --json | python3 -c 'import json,sys; print(next(h["api"] for h in json.load(sys.stdin)["hosts"] if h["id"]==sys.argv[1]))' "$victim")"
index=$(( ${api##*:} - 8081 ))
echo "==> kill -9 host $victim ($api), which runs a task of the count stage"
kill -9 "${host_pids[$index]}"
wait "${host_pids[$index]}" 2>/dev/null || true
[ "$index" = 0 ] && export WEIR_HOST=http://127.0.0.1:8082
killed=$(date +%s%N)
until "$weir" job "$id" --json | python3 -c 'import json,sys; s=next(s for s in json.load(sys.stdin)["stages"] if s["name"]=="count"); sys.exit(0 if s["host"]!=sys.argv[1] and s["status"]=="running" else 1)' "$victim" 2>/dev/null; do
    sleep 0.1
done
echo "==> that count task runs again elsewhere, $(( ($(date +%s%N) - killed) / 1000000 )) ms after the SIGKILL:"
"$weir" job "$id" | grep -E '^stage'

echo "==> waiting for the job to finish"
until "$weir" job "$id" --json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["job"]["lifecycle"]["status"]=="finished" else 1)'; do
    sleep 1
done
sleep 1 # the cluster's job list catches up every half second
"$weir" list
streams check 60000
