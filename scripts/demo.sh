#!/usr/bin/env bash
# The README's first command: builds the wordcount plugins (Wasm components)
# and the host, then runs the wordcount job embedded (no server, no services)
# and shows the most frequent words it counted.
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

echo "==> building the host and running examples/wordcount/job.toml" >&2
rm -rf examples/wordcount/out
cargo run -p weir -- run examples/wordcount/job.toml

echo "==> the most frequent words (final counts from examples/wordcount/out/)" >&2
awk '$2 > count[$1] { count[$1] = $2 } END { for (w in count) print count[w], w }' examples/wordcount/out/part-* \
    | sort -k1,1nr -k2 | head -n 10
