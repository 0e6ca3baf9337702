"""Run aiida-core's, plumpy's and kiwipy's own test suites against aiida-zmq (issue 13's acceptance test).

Usage, from the repository root::

    python -m tests.upstream.run --trees ../shared/upstream            # all three suites on aiida-zmq
    python -m tests.upstream.run --suite kiwipy -- -k task_queue       # one suite, pytest arguments after --
    python -m tests.upstream.run --suite aiida-core --tests tests/engine/test_rmq.py --runs 3   # some tests, 3 times
    python -m tests.upstream.run --broker rabbitmq                     # the same selection on RabbitMQ (127.0.0.1)
    python -m tests.upstream.run --compare                             # what passed on RabbitMQ but not on aiida-zmq

``--trees`` is a folder with ``aiida-core/tests``, ``plumpy/tests`` and ``kiwipy/test`` (verbatim copies of the
upstream suites); without it the runner looks in ``../shared/upstream`` beside the repository, and if there is nothing
there it says that it skips and why, and exits 0 (as it does with ``AIIDA_ZMQ_NO_UPSTREAM=1`` set). The trees are
never written to: each run copies the suite to ``build/upstream/<broker>/<suite>/`` and runs it there (tests write
into their working directory).

The suites run in their own virtual environment, ``.venv-upstream`` (``requirements.txt``: the pytest and
pytest-asyncio their lock files pin, aiida-core's test dependencies, aiida-zmq from this checkout), created or updated
when the requirements change. How each suite is put on aiida-zmq:

- aiida-core: ``pytest --aiida-broker=zmq`` (aiida-zmq's own pytest option: the session profile that aiida-core's
  ``tests/conftest.py`` makes with ``aiida_profile_factory`` gets the ``zmq`` broker), with aiida-core's markers and
  filters (``aiida-core.ini``), on the selection below;
- plumpy's ``tests/rmq/`` and kiwipy's thread-communicator tests: ``plugins/zmq_in_place_of_rmq.py`` starts one
  ``aiida-zmq serve`` for the session and makes kiwipy's ``RmqThreadCommunicator.connect`` return
  ``aiida_zmq.connect`` to it.

One upstream race is worked around, on both brokers: ``plugins/daemon_stop_when_busy.py`` sends aiida-core's
``quit`` again when circus refuses it because it is still starting the daemon's watchers (aiida-core then deletes the
daemon's socket directory and leaves an arbiter nobody can reach; 3 of 14 runs of ``test_daemon.py`` on RabbitMQ).

Expected failures are in ``expected_failures.yaml``, each with its reason (RabbitMQ-only API, test copy newer than the
installed wheel); no broker bug is on it. Any other failure, and any pass of an expected failure, fails the run. The
end of the output has the per-suite counts; every test's outcome is in ``build/upstream/<broker>/<suite>.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PLUGINS = HERE / 'plugins'
DEFAULT_TREES = REPO.parent / 'shared' / 'upstream'
DEFAULT_VENV = REPO / '.venv-upstream'
DEFAULT_WORK = REPO / 'build' / 'upstream'
REQUIREMENTS = HERE / 'requirements.txt'
EXPECTED = HERE / 'expected_failures.yaml'
PROGRESS_QUIET = 60.0  # seconds without a finished test file before a line says what the session is at
RUN_MARKER = 'AIIDA_ZMQ_UPSTREAM_RUN'  # in the environment of everything a suite starts: to find what it left behind

# aiida-core's broker-facing tests: everything its conftest marks as needing a broker (``requires_rmq``, and
# ``requires_broker``, which it adds to every test that uses the daemon fixtures), and the modules that drive the
# engine, the brokers, the process and daemon commands and the manager, whether marked or not.
AIIDA_CORE_SELECTION = {
    'markers': ['requires_rmq', 'requires_broker'],
    'paths': [
        'tests/engine',
        'tests/brokers',
        'tests/manage',
        'tests/cmdline/commands/test_process.py',
        'tests/cmdline/commands/test_daemon.py',
        'tests/cmdline/commands/test_status.py',
        'tests/cmdline/commands/test_rabbitmq.py',
    ],
}
# Which modules can hold a selected test outside those paths: the ones that name a marker or a daemon fixture (the
# conftest adds ``requires_broker`` through ``daemon_client``, which ``started_daemon_client``,
# ``stopped_daemon_client`` and ``submit_and_await`` request). Collecting only those spares collecting some 2,600
# other tests, and the optional dependencies some of them import (pymatgen, flask).
AIIDA_CORE_MARKER_WORDS = ('requires_rmq', 'requires_broker', 'daemon_client', 'submit_and_await')


@dataclasses.dataclass
class Suite:
    name: str
    tests: str  # the suite's test folder inside its tree
    ini: str
    args: list[str]
    timeout: float  # seconds for the whole session
    runs: int = 1
    plugins: tuple[str, ...] = ()  # from PLUGINS, on aiida-zmq only
    zmq_args: tuple[str, ...] = ()


# The quick ones first: they answer in seconds.
SUITES = {
    'kiwipy': Suite(
        'kiwipy',
        'test',
        'kiwipy.ini',
        ['test/rmq/test_rmq_thread_communicator.py', 'test/rmq/test_futures.py', 'test/test_local.py'],
        timeout=10 * 60,
        plugins=('zmq_in_place_of_rmq',),
    ),
    'plumpy': Suite(
        'plumpy', 'tests', 'plumpy.ini', ['tests/rmq'], timeout=10 * 60, runs=3, plugins=('zmq_in_place_of_rmq',)
    ),
    'aiida-core': Suite('aiida-core', 'tests', 'aiida-core.ini', [], timeout=45 * 60, zmq_args=('--aiida-broker=zmq',)),
}


def log(message: str) -> None:
    print(message, flush=True)


# --- the environment ------------------------------------------------------------------------------------------------


def requirements_digest() -> str:
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, REPO / 'pyproject.toml'):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv(venv: Path, work: Path, install: bool) -> Path:
    """Create or update the suites' virtual environment; return its python."""
    python = venv / 'bin' / 'python'
    stamp = venv / '.aiida-zmq-upstream'
    digest = requirements_digest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not install:
        if python.exists():
            log(f'== {venv} does not match {REQUIREMENTS.name} (--no-install): using it as it is')
            return python
        raise SystemExit(f'{venv} does not exist: run without --no-install to create it')
    log(f"== installing the suites' environment into {venv} (log: {work / 'pip.log'})")
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(work / 'pip.log', 'w') as pip_log:
        if not python.exists():
            subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, stdout=pip_log, stderr=pip_log)
        command = [str(python), '-m', 'pip', 'install', '--quiet', '-r', str(REQUIREMENTS), '-e', str(REPO)]
        result = subprocess.run(command, stdout=pip_log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = (work / 'pip.log').read_text(errors='replace')[-3000:]
        raise SystemExit(f"installing the suites' environment failed ({result.returncode}):\n{tail}")
    stamp.write_text(digest + '\n')
    log(f'   done in {time.monotonic() - started:.0f} s')
    return python


# --- selecting and running ------------------------------------------------------------------------------------------


def aiida_core_candidates(tree: Path) -> list[str]:
    """The modules of aiida-core's suite that can hold a selected test (see ``AIIDA_CORE_MARKER_WORDS``)."""
    tests = tree / 'tests'
    found = set()
    for path in sorted(tests.rglob('test_*.py')):
        relative = path.relative_to(tree).as_posix()
        in_paths = any(relative == p or relative.startswith(p + '/') for p in AIIDA_CORE_SELECTION['paths'])
        if in_paths or any(word in path.read_text(errors='replace') for word in AIIDA_CORE_MARKER_WORDS):
            found.add(relative)
    return sorted(found)


def load_expected() -> dict[str, list[dict[str, Any]]]:
    data = yaml.safe_load(EXPECTED.read_text()) or {}
    for suite, entries in data.items():
        if suite not in SUITES:
            raise SystemExit(f'{EXPECTED.name}: unknown suite {suite!r} (known: {", ".join(SUITES)})')
        for entry in entries:
            missing = {'kind', 'reason', 'tests'} - set(entry)
            if missing or entry['kind'] not in ('rabbitmq-only', 'test-copy-newer', 'not-run'):
                raise SystemExit(
                    f'{EXPECTED.name}: entry {entry!r} of {suite} needs kind (rabbitmq-only, '
                    f'test-copy-newer or not-run), reason and tests'
                )
    return data


def kill_leftovers(marker: str) -> list[str]:
    """Kill what a suite left running (found by the marker in its environment); return what was killed."""
    import psutil

    killed = []
    for process in psutil.process_iter(['pid', 'cmdline']):
        try:
            if process.pid == os.getpid() or process.environ().get(RUN_MARKER) != marker:
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            killed.append(f'{process.pid}: {" ".join(process.info["cmdline"] or [])[:200]}')
            process.kill()
        except psutil.Error:
            continue
    return killed


def run_session(
    suite: Suite,
    python: Path,
    tree: Path,
    work: Path,
    broker: str,
    extra: list[str],
    index: int,
    tests: list[str] | None = None,
) -> Path:
    """Run one pytest session of ``suite`` on a fresh copy of its tree; return its record (JSON lines).

    ``tests``: node ids or paths in the suite's tree to run instead of the suite's own (still within the selection).
    """
    copy = work / suite.name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(tree / suite.tests, copy / suite.tests, ignore=shutil.ignore_patterns('__pycache__'))
    record = work / (f'{suite.name}.jsonl' if suite.runs == 1 else f'{suite.name}.run{index}.jsonl')
    record.unlink(missing_ok=True)
    output = record.with_suffix('.log')

    marker = uuid.uuid4().hex
    # What the session writes outside its copy (tempfile's directories, pytest's basetemp, calcjob folders, circus
    # sockets, ``~/.ipython``) goes into a temporary root of its own, removed after it: short, for unix socket paths.
    temp_root = Path(tempfile.mkdtemp(prefix='azus-'))
    env = {key: value for key, value in os.environ.items() if not key.startswith(('AIIDA_', 'PYTEST_'))}
    env.update(
        {
            'PATH': f'{python.parent}{os.pathsep}{env.get("PATH", "")}',
            'PYTHONPATH': str(PLUGINS),
            'AIIDA_ZMQ_UPSTREAM_RECORD': str(record),
            RUN_MARKER: marker,
            'TMPDIR': str(temp_root),
            'IPYTHONDIR': str(temp_root / 'ipython'),
        }
    )
    env.pop('VIRTUAL_ENV', None)
    # Selection and recorder on both brokers, so that the two runs are of the same tests.
    plugins = ['upstream_recorder', 'upstream_selection']
    selection: dict[str, Any] = {
        'not_run': [
            test
            for entry in EXPECTED_ENTRIES.get(suite.name, [])
            if entry['kind'] == 'not-run'
            for test in entry['tests']
        ]
    }
    args = list(tests) if tests else [*suite.args]
    if broker == 'zmq':
        plugins += list(suite.plugins)
        args += list(suite.zmq_args)
    if suite.name == 'aiida-core':
        plugins.append('daemon_stop_when_busy')  # an upstream race, on both brokers (see the plugin)
        selection.update(AIIDA_CORE_SELECTION)
        if not tests:
            args += aiida_core_candidates(tree)
    env['AIIDA_ZMQ_UPSTREAM_SELECTION'] = json.dumps(selection)
    command = [
        str(python),
        '-m',
        'pytest',
        '-c',
        str(HERE / suite.ini),
        '--rootdir',
        str(copy),
        '-p',
        'no:cacheprovider',
    ]
    for plugin in plugins:
        command += ['-p', plugin]
    command += [*args, *extra]

    started = time.monotonic()
    try:
        with open(output, 'w') as out:
            process = subprocess.Popen(
                command, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                timed_out = wait_with_progress(process, Progress(record), suite.timeout)
            except BaseException:  # the runner interrupted (Ctrl-C, SIGTERM): the session and what it started go too
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kill_leftovers(marker)
                raise
        elapsed = time.monotonic() - started
        leftovers = kill_leftovers(marker)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    with open(record, 'a') as handle:
        handle.write(
            json.dumps(
                {
                    'session': 'runner',
                    'seconds': elapsed,
                    'timed_out': timed_out,
                    'returncode': process.returncode,
                    'leftovers': leftovers,
                    'log': str(output),
                }
            )
            + '\n'
        )
    return record


class Progress:
    """A line per test file of a running session, as its record (written by ``upstream_recorder``) grows.

    Between files, a line every ``PROGRESS_QUIET`` seconds says which file the session is in: a suite's daemon tests
    take minutes, and a silent runner looks hung.
    """

    def __init__(self, record: Path) -> None:
        self._record = record
        self._offset = 0
        self._file: str | None = None
        self._counts: Counter[str] = Counter()
        self._tests = 0
        self._started = self._said = time.monotonic()

    def poll(self) -> None:
        try:
            with open(self._record, 'rb') as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b''
        complete = chunk[: chunk.rfind(b'\n') + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        for line in complete.decode(errors='replace').splitlines():
            entry = json.loads(line)
            if 'nodeid' not in entry or entry.get('outcome') == 'deselected':
                continue
            test_file = entry['nodeid'].split('::')[0]
            if test_file != self._file:
                self._flush()
                self._file = test_file
            self._counts[entry['outcome']] += 1
            self._tests += 1
        if time.monotonic() - self._said >= PROGRESS_QUIET:
            self._say(f'in {self._file or "collection"}: {self._tests} tests so far')

    def finish(self) -> None:
        self.poll()
        self._flush()

    def _flush(self) -> None:
        if self._file is not None and self._counts:
            counts = ', '.join(f'{number} {outcome}' for outcome, number in sorted(self._counts.items()))
            self._say(f'{self._file}: {counts}')
        self._counts.clear()

    def _say(self, what: str) -> None:
        log(f'   {what} ({time.monotonic() - self._started:.0f} s)')
        self._said = time.monotonic()


def wait_with_progress(process: subprocess.Popen[bytes], progress: Progress, timeout: float) -> bool:
    """Wait for the session, printing its progress; kill it (and what it started) at ``timeout``: True then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            process.wait(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            progress.poll()
            if time.monotonic() < deadline:
                continue
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            progress.finish()
            return True
        progress.finish()
        return False


# --- results --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    suite: str
    run: int
    outcomes: dict[str, dict[str, Any]]
    session: dict[str, Any]
    runner: dict[str, Any]

    @property
    def log(self) -> str:
        return self.runner.get('log', '')


def read_record(suite: str, run: int, path: Path) -> Result:
    outcomes: dict[str, dict[str, Any]] = {}
    session: dict[str, Any] = {}
    runner: dict[str, Any] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get('session') == 'finished':
                session = entry
            elif entry.get('session') == 'runner':
                runner = entry
            elif entry.get('outcome') != 'deselected':
                outcomes[entry['nodeid']] = entry
    return Result(suite, run, outcomes, session, runner)


def node_pattern(pattern: str) -> Any:
    """The node id patterns of ``expected_failures.yaml``, as ``plugins/upstream_selection.py`` reads them."""
    return _selection_plugin().node_pattern(pattern)


@functools.cache
def _selection_plugin() -> Any:
    # The plugins are modules of their own on the sessions' PYTHONPATH (not a package); load this one from its file.
    spec = importlib.util.spec_from_file_location('upstream_selection', PLUGINS / 'upstream_selection.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_kind(suite: str, nodeid: str) -> dict[str, Any] | None:
    for entry in EXPECTED_ENTRIES.get(suite, []):
        if entry['kind'] != 'not-run' and any(node_pattern(test).match(nodeid) for test in entry['tests']):
            return entry
    return None


def classify(result: Result, broker: str = 'zmq') -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {key: [] for key in ('passed', 'failed', 'expected', 'unexpected-pass', 'skipped')}
    for nodeid, entry in sorted(result.outcomes.items()):
        outcome = entry['outcome']
        expected = expected_kind(result.suite, nodeid)
        if broker == 'rabbitmq' and expected and expected['kind'] == 'rabbitmq-only':
            expected = None  # on RabbitMQ these are tests like any other
        if outcome == 'failed':
            groups['expected' if expected else 'failed'].append(nodeid)
        elif outcome in ('passed', 'xpassed'):
            groups['unexpected-pass' if expected else 'passed'].append(nodeid)
        else:  # skipped, xfailed
            groups['skipped'].append(nodeid)
    return groups


def report(results: list[Result], broker: str, seconds: float | None = None) -> int:
    """Print failures and per-suite counts; return the exit code: 1 on anything unexpected (on aiida-zmq).

    On RabbitMQ (the reference run) failures are listed and counted but do not fail the run.
    """
    problems = 0
    rows = []
    for result in results:
        repeated = len([other for other in results if other.suite == result.suite]) > 1
        label = f'{result.suite} #{result.run}' if repeated else result.suite
        groups = classify(result, broker)
        for nodeid in groups['failed']:
            entry = result.outcomes[nodeid]
            flag = 'UNEXPECTED FAILURE' if broker == 'zmq' else 'failed'
            log(f'{flag} [{label}] {nodeid} ({entry.get("phase", "?")}): {entry.get("message", "")}')
        if broker == 'zmq':
            for nodeid in groups['unexpected-pass']:
                log(f'UNEXPECTED PASS [{label}] {nodeid}: remove it from {EXPECTED.name}')
            problems += len(groups['failed']) + len(groups['unexpected-pass'])
        session_problem = ''
        if result.runner.get('timed_out'):
            session_problem = f'the session hit its deadline ({SUITES[result.suite].timeout:.0f} s) and was killed'
        elif not result.session:
            session_problem = f'the session ended without finishing (exit {result.runner.get("returncode")})'
        elif not result.outcomes:
            session_problem = f'the session ran no test (pytest exit {result.session.get("exitstatus")})'
        if session_problem:
            log(f'SESSION PROBLEM [{label}] {session_problem}: see {result.log}')
        if result.runner.get('leftovers'):
            log(f'LEFT RUNNING [{label}] killed after the session: {result.runner["leftovers"]}')
        problems += bool(session_problem) + bool(result.runner.get('leftovers'))
        rows.append((label, groups, result.runner.get('seconds', 0.0)))

    log(f'\n== upstream suites on {"aiida-zmq" if broker == "zmq" else "RabbitMQ"}')
    log(
        f'{"suite":<16}{"passed":>8}{"failed":>8}{"expected-failed":>17}{"unexpected-pass":>17}{"skipped":>9}{"time":>8}'
    )
    totals = dict.fromkeys(('passed', 'failed', 'expected', 'unexpected-pass', 'skipped'), 0)
    for label, groups, session_seconds in rows:
        counts = {key: len(value) for key, value in groups.items()}
        for key in totals:
            totals[key] += counts[key]
        log(
            f'{label:<16}{counts["passed"]:>8}{counts["failed"]:>8}{counts["expected"]:>17}'
            f'{counts["unexpected-pass"]:>17}{counts["skipped"]:>9}{session_seconds:>7.0f}s'
        )
    if seconds is not None:
        log(f'total {seconds:.0f} s for the suites (not counting the installation of their environment)')
    if broker == 'zmq':
        # The closing line, the last one, as CI reads it: failed counts what fails the run (unexpected failures and
        # passes, sessions that died, processes left running); skipped includes the expected failures.
        log(f'(skipped below: {totals["skipped"]} skipped + {totals["expected"]} expected failures)')
        log(f'upstream: {totals["passed"]} passed, {problems} failed, {totals["skipped"] + totals["expected"]} skipped')
    return 1 if problems else 0


def compare(work: Path) -> int:
    """Print the tests that passed on RabbitMQ and not on aiida-zmq (and the other way round), per suite."""
    for name in SUITES:
        runs = {}
        for broker in ('zmq', 'rabbitmq'):
            paths = sorted((work / broker).glob(f'{name}*.jsonl'))
            if not paths:
                break
            merged: dict[str, str] = {}
            for index, path in enumerate(paths):
                for nodeid, entry in read_record(name, index, path).outcomes.items():
                    # over repeated runs: a test counts as passed only if it passed every time
                    if merged.get(nodeid) in (None, 'passed'):
                        merged[nodeid] = entry['outcome']
            runs[broker] = merged
        if len(runs) < 2:
            log(f'{name}: no run on both brokers in {work}')
            continue
        zmq, rabbitmq = runs['zmq'], runs['rabbitmq']
        only_rabbitmq = sorted(t for t, o in rabbitmq.items() if o == 'passed' and zmq.get(t) != 'passed')
        only_zmq = sorted(t for t, o in zmq.items() if o == 'passed' and rabbitmq.get(t) != 'passed')
        log(
            f'\n== {name}: {sum(o == "passed" for o in rabbitmq.values())} pass on RabbitMQ, '
            f'{sum(o == "passed" for o in zmq.values())} on aiida-zmq'
        )
        for nodeid in only_rabbitmq:
            kind = expected_kind(name, nodeid)
            log(
                f'  RabbitMQ only: {nodeid} ({zmq.get(nodeid, "not run")}'
                f'{"; expected: " + kind["kind"] if kind else ""})'
            )
        for nodeid in only_zmq:
            log(f'  aiida-zmq only: {nodeid} (RabbitMQ: {rabbitmq.get(nodeid, "not run")})')
    return 0


EXPECTED_ENTRIES: dict[str, list[dict[str, Any]]] = {}


def rabbitmq_listening() -> bool:
    import socket

    try:
        with socket.create_connection(('127.0.0.1', 5672), timeout=2):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m tests.upstream.run', description=__doc__.split('\n\n')[0])
    parser.add_argument('--trees', type=Path, help=f"folder with the suites' source trees (default: {DEFAULT_TREES})")
    parser.add_argument('--suite', action='append', choices=list(SUITES), help='run only this suite (repeatable)')
    parser.add_argument(
        '--broker',
        choices=('zmq', 'rabbitmq'),
        default='zmq',
        help='zmq (default), or rabbitmq at 127.0.0.1:5672 for the reference figures',
    )
    parser.add_argument('--venv', type=Path, default=DEFAULT_VENV, help="the suites' virtual environment")
    parser.add_argument('--work', type=Path, default=DEFAULT_WORK, help='where copies, logs and records go')
    parser.add_argument('--no-install', action='store_true', help='use the environment as it is')
    parser.add_argument(
        '--runs', type=int, help='sessions per suite (default: 3 for plumpy, whose failures were intermittent, else 1)'
    )
    parser.add_argument(
        '--tests',
        nargs='+',
        metavar='ID',
        help="node ids or paths in the suite's tree to run instead of the suite's own (with one --suite)",
    )
    parser.add_argument('--compare', action='store_true', help='compare the last runs on both brokers and exit')
    parser.add_argument('pytest_args', nargs='*', help='after --: passed to every pytest session (e.g. -k NAME, -x)')
    options = parser.parse_args(argv)

    if options.tests and len(options.suite or ()) != 1:
        parser.error('--tests needs exactly one --suite')
    # SIGTERM (CI's timeout, kill) ends the runner as Ctrl-C does: the running session is killed with what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if options.compare:
        EXPECTED_ENTRIES.update(load_expected())
        return compare(options.work)

    if os.environ.get('AIIDA_ZMQ_NO_UPSTREAM'):
        log('upstream suites: skipped (AIIDA_ZMQ_NO_UPSTREAM is set)')
        return 0
    trees = options.trees or DEFAULT_TREES
    names = options.suite or list(SUITES)
    available = [name for name in names if (trees / name / SUITES[name].tests).is_dir()]
    for name in sorted(set(names) - set(available)):
        log(
            f'upstream suites: skipping {name}: no {trees / name / SUITES[name].tests} (the source trees of the '
            'upstream suites are not on this machine; give them with --trees)'
        )
    if not available:
        log('upstream suites: skipped, nothing to run')
        return 0
    if options.broker == 'rabbitmq' and not rabbitmq_listening():
        log('upstream suites: --broker rabbitmq needs RabbitMQ on 127.0.0.1:5672, and nothing listens there')
        return 2

    EXPECTED_ENTRIES.update(load_expected())
    work = options.work.resolve() / options.broker  # absolute: each session runs in its copy, with --rootdir in it
    python = ensure_venv(options.venv, options.work, not options.no_install)
    results = []
    started = time.monotonic()
    for name in available:
        suite = dataclasses.replace(SUITES[name], runs=options.runs or SUITES[name].runs)
        for index in range(1, suite.runs + 1):
            log(f'== {name}{f" run {index} of {suite.runs}" if suite.runs > 1 else ""} on {options.broker}')
            work.mkdir(parents=True, exist_ok=True)
            path = run_session(
                suite, python, trees / name, work, options.broker, options.pytest_args, index, options.tests
            )
            result = read_record(name, index, path)
            log(f'   {len(result.outcomes)} tests in {result.runner.get("seconds", 0):.0f} s (log: {result.log})')
            results.append(result)
    return report(results, options.broker, time.monotonic() - started)


if __name__ == '__main__':
    sys.exit(main())
