#!/usr/bin/env bash
# Builds the Zig `count` operator into a Weir plugin (a Wasm component):
#   bash examples/zig-count/build.sh [OUT.wasm]
# Installs its toolchain first if needed: Zig from PyPI (the `ziglang`
# package) in a virtualenv under target/toolchains/zig. `weir plugin
# componentize` makes the component; set WEIR to a built `weir` binary,
# else `cargo run` builds one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/lang/zig-count.wasm}"
venv="$root/target/toolchains/zig"
# Exit code 3: the toolchain cannot be installed (the tests name it).
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1; then
    command -v python3 >/dev/null || { echo "python3 is not installed" >&2; exit 3; }
    echo "==> installing Zig 0.17.1 (PyPI: ziglang) into $venv" >&2
    python3 -m venv "$venv" || { echo "python3 -m venv failed" >&2; exit 3; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check ziglang==0.17.1 \
        || { rm -rf "$venv"; echo "pip could not install ziglang" >&2; exit 3; }
fi
if [ -n "${WEIR:-}" ]; then
    weir=("$WEIR")
else
    weir=(cargo run -q --manifest-path "$root/Cargo.toml" -p weir --)
fi
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
# A freestanding module: no libc, no WASI imports, no entry point.
"$venv/bin/python" -m ziglang build-exe "$here/count.zig" -target wasm32-freestanding \
    -fno-entry -rdynamic -O ReleaseSmall --cache-dir "$build/cache" --global-cache-dir "$venv/zig-cache" \
    -femit-bin="$build/count.core.wasm"
mkdir -p "$(dirname "$out")"
"${weir[@]}" plugin componentize "$build/count.core.wasm" -o "$out"
