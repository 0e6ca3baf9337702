"""The upstream runner's own logic: skipping without trees, and judging outcomes against the expected failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.upstream import run


def test_without_the_trees_it_says_it_skips_and_succeeds(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, '-m', 'tests.upstream.run', '--trees', str(tmp_path / 'nowhere')],
        cwd=run.REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'skipping aiida-core: no' in result.stdout
    assert 'upstream suites: skipped' in result.stdout


def test_the_expected_failures_are_well_formed_and_name_no_broker_bug() -> None:
    expected = run.load_expected()
    assert set(expected) <= set(run.SUITES)
    for entries in expected.values():
        for entry in entries:
            assert entry['kind'] in ('rabbitmq-only', 'test-copy-newer', 'not-run')
            assert len(entry['reason']) > 20 and entry['tests']


def record(tmp_path: Path, outcomes: dict[str, str]) -> Path:
    path = tmp_path / 'kiwipy.jsonl'
    lines = [{'nodeid': nodeid, 'outcome': outcome, 'message': 'boom'} for nodeid, outcome in outcomes.items()]
    lines.append({'session': 'finished', 'exitstatus': 1, 'collected': len(outcomes)})
    lines.append({'session': 'runner', 'seconds': 1.0, 'timed_out': False, 'returncode': 1, 'leftovers': []})
    path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    return path


@pytest.fixture
def expected(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {'kiwipy': [{'kind': 'rabbitmq-only', 'reason': 'RabbitMQ only', 'tests': ['t.py::rmq_*']}]}
    monkeypatch.setattr(run, 'EXPECTED_ENTRIES', entries)


@pytest.mark.usefixtures('expected')
def test_an_expected_failure_passes_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run.read_record('kiwipy', 1, record(tmp_path, {'t.py::ok': 'passed', 't.py::rmq_props': 'failed'}))
    assert run.report([result], 'zmq') == 0
    out = capsys.readouterr().out
    assert 'upstream: 1 passed, 0 failed, 1 skipped' in out
    assert 'expected-failed' in out


@pytest.mark.usefixtures('expected')
@pytest.mark.parametrize(
    ('outcomes', 'says'),
    [
        ({'t.py::ok': 'failed'}, 'UNEXPECTED FAILURE [kiwipy] t.py::ok'),
        ({'t.py::rmq_props': 'passed'}, 'UNEXPECTED PASS [kiwipy] t.py::rmq_props'),
    ],
)
def test_an_unexpected_outcome_fails_the_run_and_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], outcomes: dict[str, str], says: str
) -> None:
    result = run.read_record('kiwipy', 1, record(tmp_path, outcomes))
    assert run.report([result], 'zmq') == 1
    assert says in capsys.readouterr().out


@pytest.mark.usefixtures('expected')
def test_a_session_that_died_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / 'kiwipy.jsonl'
    path.write_text(json.dumps({'session': 'runner', 'seconds': 600, 'timed_out': True, 'returncode': -9}) + '\n')
    assert run.report([run.read_record('kiwipy', 1, path)], 'zmq') == 1
    out = capsys.readouterr().out
    assert 'SESSION PROBLEM [kiwipy] the session hit its deadline' in out
    assert out.splitlines()[-1] == 'upstream: 0 passed, 1 failed, 0 skipped'


def test_progress_prints_a_line_per_test_file_and_while_one_is_long(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suite's session prints as it runs (issue 22, item 2): a line per finished file, one while a file is long."""
    path = tmp_path / 'suite.jsonl'
    progress = run.Progress(path)
    progress.poll()  # no record yet: nothing to say, no error
    lines = [
        {'nodeid': 'tests/a.py::one', 'outcome': 'passed'},
        {'nodeid': 'tests/b.py::skipped', 'outcome': 'deselected'},
        {'nodeid': 'tests/a.py::two', 'outcome': 'skipped'},
        {'nodeid': 'tests/b.py::three', 'outcome': 'failed'},
    ]
    path.write_text(''.join(json.dumps(line) + '\n' for line in lines) + '{"nodeid": "tests/b.py::fo')  # half a line
    progress.poll()
    out = capsys.readouterr().out
    assert 'tests/a.py: 1 passed, 1 skipped (' in out and 'tests/b.py' not in out, out
    monkeypatch.setattr(run, 'PROGRESS_QUIET', 0.0)
    progress.poll()
    assert 'in tests/b.py: 3 tests so far (' in capsys.readouterr().out
    with path.open('a') as handle:
        handle.write('ur", "outcome": "passed"}\n' + json.dumps({'session': 'finished', 'exitstatus': 1}) + '\n')
    progress.finish()
    assert 'tests/b.py: 1 failed, 1 passed (' in capsys.readouterr().out


def test_a_session_gets_a_temporary_root_that_is_removed_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TMPDIR and IPYTHONDIR of a suite's session point into a root of the runner's, gone when the session ended."""
    tree = tmp_path / 'tree'
    (tree / 'tests').mkdir(parents=True)
    (tree / 'tests' / 'test_where.py').write_text(
        'import os, tempfile\n'
        'def test_where():\n'
        '    tempfile.mkdtemp(prefix="left-")\n'
        '    print("TMPDIR", os.environ["TMPDIR"], "IPYTHONDIR", os.environ["IPYTHONDIR"])\n'
    )
    suite = run.Suite('kiwipy', 'tests', 'kiwipy.ini', ['tests/test_where.py', '-s'], timeout=120)
    monkeypatch.setattr(run, 'EXPECTED_ENTRIES', {})
    record = run.run_session(suite, Path(sys.executable), tree, tmp_path / 'work', 'rabbitmq', [], 1)
    log = Path(run.read_record('kiwipy', 1, record).log).read_text()
    words = log.split('TMPDIR ', 1)[1].split()
    root = Path(words[0])
    assert words[1:3] == ['IPYTHONDIR', str(root / 'ipython')], log
    assert root.name.startswith('azus-') and not root.exists(), log
    assert run.read_record('kiwipy', 1, record).outcomes['tests/test_where.py::test_where']['outcome'] == 'passed'
