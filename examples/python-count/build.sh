#!/usr/bin/env bash
# Builds the Python `count` operator into a Weir plugin (a Wasm component):
#   bash examples/python-count/build.sh [OUT.wasm [MODULE]]
# MODULE is `count` (default) or `count_v2` (the version with a migration).
# Installs its toolchain first if needed: componentize-py from PyPI, in a
# virtualenv under target/toolchains/python (no system-wide install).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/lang/python-count.wasm}"
module="${2:-count}"
world=operator-plugin
# A module that defines `Migration` exports schema migration.
grep -q '^Migration = ' "$here/$module.py" && world=migrating-operator-plugin
venv="$root/target/toolchains/python"
# Exit code 3: the toolchain cannot be installed (the tests name it).
if [ ! -x "$venv/bin/componentize-py" ]; then
    command -v python3 >/dev/null || { echo "python3 is not installed" >&2; exit 3; }
    echo "==> installing componentize-py 0.25.1 into $venv" >&2
    python3 -m venv "$venv" || { echo "python3 -m venv failed" >&2; exit 3; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check componentize-py==0.25.1 \
        || { rm -rf "$venv"; echo "pip could not install componentize-py" >&2; exit 3; }
fi
mkdir -p "$(dirname "$out")"
export PYTHONDONTWRITEBYTECODE=1
"$venv/bin/componentize-py" -d "$root/wit" -w "$world" \
    componentize "$module" -p "$here" -p "$root/guest-sdk/python" -o "$out"
