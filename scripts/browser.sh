#!/usr/bin/env bash
# Installs the browser the dashboard test drives: Debian's chromium and
# chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver). Idempotent.
# Exit code 3: they cannot be installed (the test names them; under CI it
# fails).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "browser: no apt-get to install chromium and chromium-driver" >&2
    exit 3
fi
echo "==> installing chromium, chromium-driver (apt-get)" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
{ $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null; }; } \
    || { echo "apt-get could not install chromium and chromium-driver" >&2; exit 3; }
