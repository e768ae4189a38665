#!/usr/bin/env bash
# Installs what building Weir needs and is not a crate: the wasm32-wasip2
# Rust target (guest plugins) and libclang (bindgen for the rocksdb crate).
# Idempotent and quick when everything is there.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust with rustup first (https://rustup.rs)" >&2
    exit 1
fi

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "setup: adding the wasm32-wasip2 Rust target" >&2
    rustup target add wasm32-wasip2
fi

# libclang itself (libclang.so / libclang-<version>.so), not libclang-cpp,
# which a fresh Debian machine may already have.
have_libclang() {
    ldconfig -p 2>/dev/null | grep -Eq '/libclang(-[0-9.]+)?\.so' && return 0
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
        /usr/lib/*/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}

needs_libclang() {
    if command -v dpkg-query >/dev/null 2>&1; then
        # Debian: the -dev package also brings clang's headers bindgen needs.
        ! dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "install ok installed"
    else
        ! have_libclang
    fi
}

if needs_libclang; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing libclang-dev (needed by the rocksdb crate's bindgen)" >&2
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev clang >/dev/null
    else
        echo "setup: libclang not found; install your distribution's libclang development package" >&2
        exit 1
    fi
fi
