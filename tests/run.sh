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
echo '== ruff'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo '== mypy'
.venv/bin/mypy
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
