#!/usr/bin/env bash
# Installs the Kafka-protocol broker the kafka connector tests start:
# noida-db 0.2.3 (one binary speaking the Kafka protocol, with transactions
# and read_committed) from PyPI, pinned by hash, into target/tools/kafka, and
# the second client the tests check the connectors with from the outside:
# confluent-kafka 2.16.1 (librdkafka inside its wheel), pinned by hash, into
# target/tools/kafka/client. Built in a temporary directory and renamed into
# place, so a half-done install is never used. Idempotent; prints the
# broker binary's path. Exit code 3: it cannot be installed (the tests say
# so; under CI they fail).
#
# `kafka.sh --args PORT DIR` prints the broker's arguments for a Kafka
# listener on 127.0.0.1:PORT with its data in DIR (the tests and
# examples/kafka-wordcount start it so).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--args" ]; then
    echo "start --only kafka --host 127.0.0.1 --kafka-port $2 --data-dir $3"
    exit 0
fi
# One install at a time: tests that need it start together, and one
# install must not remove the copy another has just put in place.
mkdir -p target/tools
exec 9>target/tools/.kafka.lock
flock 9
dir="target/tools/kafka"
bin="$dir/noida_db/noida-db"
installed() {
    [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q "0.2.3" \
        && [ -f "$dir/client/confluent_kafka/__init__.py" ]
}
if installed; then
    echo "$PWD/$bin"
    exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "kafka: the pinned noida-db and confluent-kafka wheels are for x86_64, this is $(uname -m)" >&2
    exit 3
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "kafka: the pinned confluent-kafka wheel is for CPython 3.11, python3 is $(python3 --version 2>&1)" >&2
    exit 3
fi
echo "==> installing noida-db 0.2.3 and confluent-kafka 2.16.1 (PyPI) into $dir" >&2
staging="$(mktemp -d target/tools/.kafka.XXXXXX)"
trap 'rm -rf "$staging"' EXIT
echo "noida-db==0.2.3 --hash=sha256:40a2fb15567e3d344e7483df62bb439e7d64ac6fb232f4f223554aed58204f82" \
    >"$staging/broker.txt"
echo "confluent-kafka==2.16.1 --hash=sha256:24f613cc81a856b6fbb2d7d11044a9aa770044eecc1f83ff84618688b056be06" \
    >"$staging/client.txt"
pip() {
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --no-deps --only-binary=:all: --require-hashes "$@" >&2
}
pip --target "$staging/kafka" -r "$staging/broker.txt" \
    || { echo "kafka: pip could not install noida-db 0.2.3" >&2; exit 3; }
pip --target "$staging/kafka/client" -r "$staging/client.txt" \
    || { echo "kafka: pip could not install confluent-kafka 2.16.1" >&2; exit 3; }
chmod +x "$staging/kafka/noida_db/noida-db"
rm -rf "$dir"
mv -T "$staging/kafka" "$dir"
installed || { echo "kafka: the installed copy in $dir does not run" >&2; exit 3; }
echo "$PWD/$bin"
