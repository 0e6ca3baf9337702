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

# RabbitMQ, only for the migration tests: started when nothing listens on 5672 (installed first where this machine
# can), and stopped again when this script ends, however it ends; one that was running before is left alone.
# Without it those tests skip, saying why. AIIDA_ZMQ_NO_RABBITMQ=1 opts out.
# shellcheck source=tests/rabbitmq.sh
. tests/rabbitmq.sh
# Everything the run writes outside the clone goes into one temporary root (TMPDIR), removed at the end.
# shellcheck source=tests/temproot.sh
. tests/temproot.sh
temproot_start
trap 'rabbitmq_stop; temproot_remove' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
rabbitmq_start
# libfaketime, for the clock-jump test (tests/test_stalls.py; it skips, saying why, without it): installed as root.
if ! command -v faketime >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq faketime >/dev/null 2>&1 || echo 'could not install faketime: the clock-jump test skips' >&2
fi
# shellcheck source=tests/lazyfs.sh
. tests/lazyfs.sh
lazyfs_build
echo '== ruff'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo '== mypy'
.venv/bin/mypy
echo '== docs'
.venv/bin/mkdocs build --strict --quiet
echo '== pytest'
set +e
# Two workers, a test file each (the suite mostly waits on real daemons; a module's AiiDA profile stays in one worker).
.venv/bin/python -m pytest -ra -q -p no:cacheprovider -n 2 --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo 'pytest collected no tests: that is a failure here' >&2
    exit 1
fi
# aiida-core's, plumpy's and kiwipy's own suites on aiida-zmq (tests/upstream/run.py; it skips, saying why, without them).
.venv/bin/python -m tests.upstream.run --trees ../shared/upstream || status=1
temproot_check || status=1
exit "$status"
