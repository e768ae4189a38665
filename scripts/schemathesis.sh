#!/usr/bin/env bash
# Installs the HTTP API fuzzer the tests run against a live `weir serve`
# (tests/e2e/api_fuzz.rs): schemathesis 4.32.5 and its dependencies from
# PyPI, every wheel pinned by hash, into target/tools/schemathesis (built in
# a temporary directory and renamed into place, so a half-done install is
# never used). Prints the path of a wrapper that runs it. Idempotent. Exit
# code 3: it cannot be installed (the tests say so; under CI they fail).
set -euo pipefail
cd "$(dirname "$0")/.."
# One install at a time: tests that need it start together, and one
# install must not remove the copy another has just put in place.
mkdir -p target/tools
exec 9>target/tools/.schemathesis.lock
flock 9
dir="target/tools/schemathesis"
run="$dir/schemathesis"
installed() { [ -x "$run" ] && "$run" --version 2>/dev/null | grep -q "version 4.32.5"; }
if installed; then
    echo "$PWD/$run"
    exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "schemathesis: the pinned wheels are for x86_64, this is $(uname -m)" >&2
    exit 3
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "schemathesis: the pinned wheels are for CPython 3.11, python3 is $(python3 --version 2>&1)" >&2
    exit 3
fi
echo "==> installing schemathesis 4.32.5 (PyPI) into $dir" >&2
staging="$(mktemp -d target/tools/.schemathesis.XXXXXX)"
trap 'rm -rf "$staging"' EXIT
cat >"$staging/requirements.txt" <<'REQUIREMENTS'
anyio==4.16.0 --hash=sha256:c66ae634e0b8228396b801741beb3294326d4b6102f7bba4041c0dfb58c29026
certifi==2026.10.19.post1 --hash=sha256:1324c476b4811eff41a8bc2122cd0bbd4d9c7234c725446d99ab1612b3a7fdd2
charset-normalizer==3.5.3 --hash=sha256:2a6f937e0b70133d1f826d0a253331b6fe1a4c874808cc12e16f2fb8177042f4
click==8.5.1 --hash=sha256:8bb5376d2006950386f8c6427613334a2acadc5f559cb80e638d00b4df957e37
graphql-core==3.3.2 --hash=sha256:d83f49ee18d2db89fb575dab6ffefa8aa1bf5f60dff8a6781db6f63420041348
harfile==0.6.0 --hash=sha256:0f2209d6ec164a2aea7e8fb2b49d9fef5ddeee51b65dbfd28a4167185c34bb30
hypothesis==6.170.27 --hash=sha256:cf8ef2e555198a0973bdfab9d4cc47b3aaf281b7006e380b61580ad94ab0da01
hypothesis-graphql==0.13.5 --hash=sha256:7bf16b290fc5b870539e0181446cda1f2aadc3b233a8b475331abc1764fe4e40
idna==3.20 --hash=sha256:ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c
iniconfig==2.3.1 --hash=sha256:9121e2c1fdb355232495be3194c8dfe87ccc2d5dee45947b78e68f499790d7a7
jsonschema_rs==0.60.3 --hash=sha256:326ec5b6800552ccd76a1acca131f70511ac013b377230bdd541db3244adc9fa
markdown-it-py==4.3.0 --hash=sha256:7aa1511a46c39138de78d9eba92ce47e63124d8003fc98b3a351909e04239efa
MarkupSafe==3.0.4 --hash=sha256:6da83a088f8ef93b2d483a8232a4dbf4d69d3d8496b568a03c56becac43e1808
mdurl==0.1.2 --hash=sha256:84008a41e51615a49fc9966191ff91509e3c40b939176e643fd50a5c2196b8f8
packaging==26.4 --hash=sha256:81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2
pluggy==1.7.0 --hash=sha256:7dd7b0d8832ba3cb632c306926ded123429211b83641b35dc5c41ad2d34f9bec
Pygments==2.21.0 --hash=sha256:2363c69b61c4a97c838da3b130dcd6468f4848992b21a82f2a63ec34377137d9
pyrate-limiter==4.6.0 --hash=sha256:d8275519d0c8466c6fec956d804d893355afce23ffeec2b21c88b8c9930941a6
pytest==9.2.0 --hash=sha256:07acdcf88ec174f907dc01af70bf52d49b014bbab03faeeade31c96b18c2e588
PyYAML==6.0.4 --hash=sha256:622aa875fa6533f25fedcffe23079357d65a690d462200afed5d8e9d0e01ebee
requests==2.34.2 --hash=sha256:2a0d60c172f83ac6ab31e4554906c0f3b3588d37b5cb939b1c061f4907e278e0
rich==15.0.0 --hash=sha256:33bd4ef74232fb73fe9279a257718407f169c09b78a87ad3d296f548e27de0bb
schemathesis==4.32.5 --hash=sha256:5ec7e532ebdf9b0e0239a943df2a565174aecda513b61e564d8ad2a3ac801f22
sortedcontainers==2.4.0 --hash=sha256:a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0
typing_extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
urllib3==2.8.0 --hash=sha256:0cf3cae568d36aa9576b28dfb35f11328f1cb974ca7647d9475ebb86c75ac6e3
Werkzeug==3.1.9 --hash=sha256:6392e50c78460ba618e5b21f08a71f59c99ce99cdc6cf6e3dd7e6ccca8754fab
REQUIREMENTS
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --only-binary=:all: --require-hashes --target "$staging/lib" \
    -r "$staging/requirements.txt" >&2 \
    || { echo "schemathesis: pip could not install schemathesis 4.32.5" >&2; exit 3; }
cat >"$staging/schemathesis" <<'WRAPPER'
#!/bin/sh
# schemathesis 4.32.5, installed by scripts/schemathesis.sh.
here="$(cd "$(dirname "$0")" && pwd)"
PYTHONPATH="$here/lib" PYTHONDONTWRITEBYTECODE=1 exec python3 -m schemathesis.cli "$@"
WRAPPER
chmod +x "$staging/schemathesis"
rm -rf "$dir"
mv -T "$staging" "$dir"
installed || { echo "schemathesis: the installed copy in $dir does not run" >&2; exit 3; }
echo "$PWD/$run"
