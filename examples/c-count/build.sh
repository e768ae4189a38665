#!/usr/bin/env bash
# Builds the C `count` operator into a Weir plugin (a Wasm component):
#   bash examples/c-count/build.sh [OUT.wasm]
# Installs its toolchain first if needed, from Debian's packages: clang,
# lld (wasm-ld), wasi-libc, and clang's wasm32 runtime. `weir plugin
# bindings c` writes the C bindings and `weir plugin componentize` makes
# the component; set WEIR to a built `weir` binary, else `cargo run` builds one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/lang/c-count.wasm}"

clang=""
for candidate in clang-14 clang; do
    if command -v "$candidate" >/dev/null; then clang="$candidate"; break; fi
done
have_toolchain() {
    [ -n "$clang" ] || return 1
    command -v wasm-ld-14 >/dev/null || command -v wasm-ld >/dev/null || return 1
    [ -f /usr/lib/wasm32-wasi/libc.a ] || return 1
    [ -f "$("$clang" --target=wasm32-wasi -print-libgcc-file-name 2>/dev/null)" ]
}
# Exit code 3: the toolchain cannot be installed (the tests name it).
if ! have_toolchain; then
    echo "==> installing clang-14, lld-14, wasi-libc, libclang-rt-14-dev-wasm32 (apt-get)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 >/dev/null; } \
        || { echo "apt-get could not install the C toolchain" >&2; exit 3; }
    clang=clang-14
fi

if [ -n "${WEIR:-}" ]; then
    weir=("$WEIR")
else
    weir=(cargo run -q --manifest-path "$root/Cargo.toml" -p weir --)
fi
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
"${weir[@]}" plugin bindings c "$build" 2>/dev/null
# A reactor (no `main`), no libc I/O: the component imports no WASI.
"$clang" --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor -O2 -Wall -Wextra -Werror \
    -I "$build" -o "$build/count.core.wasm" \
    "$here/count.c" "$build/operator_plugin.c" "$build/operator_plugin_component_type.o"
mkdir -p "$(dirname "$out")"
"${weir[@]}" plugin componentize "$build/count.core.wasm" -o "$out"
