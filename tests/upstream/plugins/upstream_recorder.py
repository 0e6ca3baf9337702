"""pytest plugin of the upstream runner: records every test's outcome, one JSON line per test as it finishes.

Loaded by ``tests/upstream/run.py`` with ``-p upstream_recorder``; the file is ``$AIIDA_ZMQ_UPSTREAM_RECORD``. Written
line by line and flushed, so that a session that dies (a hung test killed by the runner's deadline) keeps what it ran.
An outcome is ``passed``, ``failed`` (any phase: setup, call or teardown), ``skipped``, ``xfailed`` or ``xpassed``;
a module that does not import is recorded as ``failed`` under its own node id.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_records: dict[str, dict[str, Any]] = {}
_file: Any = None


def pytest_configure(config: pytest.Config) -> None:
    global _file
    path = os.environ.get('AIIDA_ZMQ_UPSTREAM_RECORD')
    if path and _file is None:
        _file = open(path, 'a', encoding='utf-8')  # open for the whole session


def pytest_unconfigure(config: pytest.Config) -> None:
    global _file
    if _file is not None:
        _file.close()
        _file = None


def _write(record: dict[str, Any]) -> None:
    if _file is not None:
        _file.write(json.dumps(record) + '\n')
        _file.flush()


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The error in a line or two: the exception pytest reports (``reprcrash``), else the end of the long repr."""
    longrepr = report.longrepr
    crash = getattr(longrepr, 'reprcrash', None)
    if crash is not None and crash.message:
        return ' '.join(str(crash.message).split())[:400]
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2])[:400]
    text = str(longrepr or '').strip().splitlines()
    return ' '.join(' '.join(text[-2:]).split())[:400]


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write({'nodeid': report.nodeid, 'outcome': 'failed', 'phase': 'collect', 'message': _message(report)})


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        _write({'nodeid': item.nodeid, 'outcome': 'deselected'})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record = _records.setdefault(report.nodeid, {'nodeid': report.nodeid, 'outcome': 'passed', 'duration': 0.0})
    record['duration'] += report.duration
    if report.outcome == 'rerun':  # pytest-rerunfailures: the next attempt decides
        _records[report.nodeid] = {'nodeid': report.nodeid, 'outcome': 'passed', 'duration': record['duration']}
        return
    wasxfail = hasattr(report, 'wasxfail')
    if report.failed and record['outcome'] != 'failed':
        record.update(outcome='failed', phase=report.when, message=_message(report))
    elif report.skipped and report.when in ('setup', 'call') and record['outcome'] == 'passed':
        record.update(outcome='xfailed' if wasxfail else 'skipped', message=_message(report))
    elif report.passed and report.when == 'call' and wasxfail:
        record['outcome'] = 'xpassed'
    if report.when == 'teardown':
        _write(_records.pop(report.nodeid))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for record in _records.values():  # a test whose teardown never ran
        _write(record)
    _records.clear()
    _write({'session': 'finished', 'exitstatus': int(exitstatus), 'collected': session.testscollected})
