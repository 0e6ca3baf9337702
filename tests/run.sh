#!/usr/bin/env bash
# The README's test command: installs everything into .venv and runs lint, types and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

# RabbitMQ, only for the migration tests (aiida-zmq migrate --to/--from rabbitmq): installed when this machine can
# (Debian/Ubuntu as root), started on 127.0.0.1 only when nothing listens on 5672. Without it those tests skip,
# saying why. AIIDA_ZMQ_NO_RABBITMQ=1 opts out.
rabbitmq_listening() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if [ -z "${AIIDA_ZMQ_NO_RABBITMQ:-}" ] && ! rabbitmq_listening; then
    if ! command -v rabbitmq-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo '== installing rabbitmq-server (for the migration tests)'
        timeout 600 apt-get install -y -qq rabbitmq-server >/dev/null 2>&1 \
            || (timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 600 apt-get install -y -qq rabbitmq-server >/dev/null 2>&1) \
            || echo 'could not install rabbitmq-server: the migration tests will skip'
    fi
    if command -v rabbitmq-server >/dev/null; then
        echo '== starting RabbitMQ on 127.0.0.1'
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
            rabbitmq-server -detached >/dev/null 2>&1 || true
        for _ in $(seq 1 120); do rabbitmq_listening && break; sleep 1; done
        rabbitmq_listening || echo 'RabbitMQ did not come up within 120 s: the migration tests will skip'
    fi
fi
echo '== ruff'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo '== mypy'
.venv/bin/mypy
echo '== docs'
.venv/bin/mkdocs build --strict --quiet
echo '== pytest'
set +e
.venv/bin/python -m pytest -ra -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo 'pytest collected no tests: that is a failure here' >&2
    exit 1
fi
exit "$status"
