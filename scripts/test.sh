#!/usr/bin/env bash
# The README's second command: the whole test suite. The test build compiles
# every guest plugin with the real wasm32-wasip2 toolchain (tests/build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test -p weir -p weir-sdk -p weir-tests "$@"
