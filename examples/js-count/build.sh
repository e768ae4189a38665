#!/usr/bin/env bash
# Builds the JavaScript `count` operator into a Weir plugin (a Wasm component):
#   bash examples/js-count/build.sh [OUT.wasm]
# Installs its toolchain first if needed (ComponentizeJS with the
# StarlingMonkey engine, and rolldown to bundle the operator with the SDK,
# at the versions package-lock.json pins; `npm install --no-save` because
# `npm ci` rejects these packages' platform-specific optional dependencies).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/lang/js-count.wasm}"
cd "$here"
# Exit code 3: the toolchain cannot be installed (the tests name it).
if [ ! -x node_modules/.bin/componentize-js ] || [ ! -x node_modules/.bin/rolldown ]; then
    command -v npm >/dev/null || { echo "node and npm are not installed" >&2; exit 3; }
    echo "==> installing ComponentizeJS and rolldown (npm install)" >&2
    npm install --no-save --no-audit --no-fund --loglevel=error \
        || { echo "npm install failed" >&2; exit 3; }
fi
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
# One module for the engine: the operator and guest-sdk/js/weir-sdk.js.
node_modules/.bin/rolldown count.js --file "$build/count.js" --format esm --log-level warn
mkdir -p "$(dirname "$out")"
# No wasi:http (the `fetch-event` handler and `http`): operators do not serve requests.
node_modules/.bin/componentize-js "$build/count.js" --wit "$root/wit" --world-name operator-plugin \
    --disable http fetch-event --out "$out"
