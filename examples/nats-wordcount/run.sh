#!/usr/bin/env bash
# The NATS word count end to end on this machine: builds the plugins and the
# host (as scripts/demo.sh does), starts a JetStream server on
# 127.0.0.1:4222 (nats-server 2.15.1, installed by scripts/nats.sh) and an
# S3 server on 127.0.0.1:8333 (SeaweedFS 4.48, scripts/seaweedfs.sh),
# creates the streams and the bucket, publishes ../wordcount/input.txt onto
# 4 partitions, runs job.toml to the end of the input and shows the output
# stream and the checkpoints on S3. The servers are stopped at the end.
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
nats_server="$(bash scripts/nats.sh)"
if [ ! -d target/tools/nats-py/nats ]; then
    echo "==> installing the nats-py client into target/tools/nats-py" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target target/tools/nats-py "nats-py==2.16.0" >&2
fi
weed="$(bash scripts/seaweedfs.sh)"
store="$(mktemp -d)"
"$nats_server" -js -a 127.0.0.1 -p 4222 -sd "$store/nats" >/dev/null 2>&1 &
nats_pid=$!
export AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=weir-example AWS_SECRET_ACCESS_KEY=weir-example-secret
mkdir -p "$store/s3"
cat >"$store/s3.json" <<JSON
{"identities":[{"name":"weir","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
"$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$store/s3" -s3 -s3.port=8333 \
    -s3.config="$store/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.volumeSizeLimitMB=64 >"$store/weed.log" 2>&1 &
weed_pid=$!
trap 'kill $nats_pid $weed_pid 2>/dev/null; wait $nats_pid $weed_pid 2>/dev/null; rm -rf "$store"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
# The bucket (a signed PUT; the gateway answers once its filer is up).
s3() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$@"; }
for _ in $(seq 120); do s3 -X PUT "$AWS_ENDPOINT_URL/weir-example" >/dev/null 2>&1 && break; sleep 0.5; done

cd examples/nats-wordcount
rm -rf weir-data
streams() { PYTHONPATH="$root/target/tools/nats-py" python3 streams.py nats://127.0.0.1:4222 "$@"; }
streams create
streams publish ../wordcount/input.txt 4
"$root/target/debug/weir" run job.toml
streams show
echo "checkpoints on S3 (s3://weir-example/nats-wordcount):"
keys="$(s3 "$AWS_ENDPOINT_URL/weir-example" | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g')"
echo "$keys" | grep '_metadata$' | sed 's/^/  /'
echo "  ($(echo "$keys" | wc -l) objects in all)"
