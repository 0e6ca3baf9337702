"""Daemon lifecycle with work in flight (issue 5): a real AiiDA daemon of two workers with the ``zmq`` broker.

``test_daemon.py`` starts and stops a quiet daemon; here every lifecycle command of the daemon (``incr``, ``decr``,
``restart`` by CLI and by Python API, ``stop`` + ``start``) happens while work chains run, and none may be lost. The
second test kills a worker that holds running processes and times how fast the events plugin hands them over.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiida_profile import AiidaZmqProfile
from cycles_helpers import alive, broker_alive_in_arbiter, daemon_processes, helper, identities

from aiida_zmq.circus import watcher_name
from aiida_zmq.testing import wait_until

pytestmark = pytest.mark.aiida

BATCH = 8  # work chains submitted before each lifecycle step: half of them parents that submit a child
FIGURES = os.environ.get('AIIDA_ZMQ_FIGURES')


def _record(name: str, value: dict[str, Any]) -> None:
    """Append a measured figure to ``$AIIDA_ZMQ_FIGURES`` (JSON lines), when set, as ``test_daemon.py`` does."""
    if FIGURES:
        with open(FIGURES, 'a') as stream:
            stream.write(json.dumps({'figure': name, **value}) + '\n')


@pytest.fixture(scope='module')
def cycles_profile(aiida_zmq_profile_factory: Callable[..., AiidaZmqProfile]) -> Iterator[AiidaZmqProfile]:
    """A profile of its own (the cycles end with the daemon stopped); ``verdi daemon restart`` starts two workers."""
    profile = aiida_zmq_profile_factory()
    # ``verdi daemon restart`` starts ``daemon.default_workers`` (1 unless set), not the number that ran before.
    profile.verdi('config', 'set', 'daemon.default_workers', '2')
    # ``verdi daemon restart`` ignores ``--timeout`` (deprecated in aiida-core 2.9) and waits ``daemon.timeout`` (2 s)
    # for the stop: workers that shut down with processes in flight take longer on a busy machine, and the restart
    # then fails ("Connection to the daemon timed out") and leaves the daemon stopped. As a user with busy workers.
    profile.verdi('config', 'set', 'daemon.timeout', '30')
    profile.daemon_start(2)
    yield profile
    assert not profile.teardown(), 'processes were left running after `verdi daemon stop`'


def _assert_broker_up(profile: AiidaZmqProfile, step: str, seen: set[tuple[int, float]]) -> dict[str, Any]:
    """The broker watcher is active in the arbiter and the broker answers ``status``; remember every daemon pid."""
    status = wait_until(
        lambda: broker_alive_in_arbiter(profile),
        timeout=60,
        interval=0.1,
        what=f'the broker watcher {profile.watcher} to be active and answer `status` after {step}',
    )
    for pids in daemon_processes(profile).values():
        seen.update(identities(pids))
    return status


def _workers_consuming(profile: AiidaZmqProfile, count: int) -> bool:
    return len(profile.worker_pids()) == count and profile.broker_consumers() == count


def _circus_log(profile: AiidaZmqProfile) -> str:
    return _log(profile, f'circus-{profile.name}')


def _assert_broker_outlived(profile: AiidaZmqProfile, workers: list[int], hook_lines_before: int) -> None:
    """The broker's ``before_stop`` hook waited for these stopping workers (its line in the circus log)."""
    marker = f'{profile.watcher}: workers ['
    lines = [line for line in _circus_log(profile).splitlines() if marker in line]
    assert len(lines) > hook_lines_before, f'no `{marker}` line of the before_stop hook in the circus log'
    waited = lines[-1].split(marker, 1)[1].split(']', 1)[0]
    # Also circusd-stats, which circus stops at the same time; what matters is that no worker is missing.
    assert set(workers) <= {int(pid) for pid in waited.split(',') if pid.strip()}, (workers, lines[-1])


def _hook_lines(profile: AiidaZmqProfile) -> int:
    return sum(f'{profile.watcher}: workers [' in line for line in _circus_log(profile).splitlines())


def _stop_and_check_nothing_left(profile: AiidaZmqProfile, seen: set[tuple[int, float]]) -> None:
    workers, before = profile.worker_pids(), _hook_lines(profile)
    profile.daemon_stop()
    _assert_broker_outlived(profile, workers, before)
    wait_until(lambda: not profile.processes(), timeout=30, interval=0.2, what='every daemon process to exit')
    try:
        # The arbiter answers ``quit`` before it exits itself: a moment, bounded.
        wait_until(lambda: not alive(seen), timeout=30, interval=0.1, what='every process the daemon ran to exit')
    except TimeoutError:
        running = {pid: ' '.join(psutil.Process(pid).cmdline()) for pid in alive(seen)}
        raise AssertionError(f'daemon processes still running 30 s after `verdi daemon stop`: {running}') from None
    left = sorted(path.name for path in profile.data_dir.iterdir() if path.name in ('broker.json', 'broker.lock'))
    sockets = sorted(path.name for path in profile.data_dir.glob('*.sock'))
    assert not left and not sockets, f'left in {profile.data_dir} after the stop: {left + sockets}'


# The default run: a restart (every worker stops with work in flight while the broker outlives them) and a stop + start
# (tasks submitted while the daemon is down). The slow variant adds incr, decr and the Python API's restart.
QUICK_STEPS = ('verdi daemon restart', 'verdi daemon stop + start')
ALL_STEPS = (
    'verdi daemon incr 1',
    'verdi daemon decr 1',
    'verdi daemon restart',
    'DaemonClient.restart_daemon()',
    'verdi daemon stop + start',
)


@pytest.mark.parametrize(
    'chosen', [pytest.param(QUICK_STEPS, id='quick'), pytest.param(ALL_STEPS, id='all', marks=pytest.mark.slow)]
)
def test_lifecycle_cycles_with_work_in_flight(cycles_profile: AiidaZmqProfile, chosen: tuple[str, ...]) -> None:
    """incr, decr, restart (CLI), restart (API), stop + start, each with work chains running: none lost."""
    profile = cycles_profile
    if profile.daemon_pid() is None:  # the variant before this one ended with the daemon stopped
        profile.daemon_start(2)
    seen: set[tuple[int, float]] = set()
    _assert_broker_up(profile, 'daemon start', seen)
    sockets = {
        endpoint[len('ipc://') :] for endpoint in profile.broker_status().get('endpoints', []) if 'ipc://' in endpoint
    }
    submitted: list[int] = []
    in_flight: dict[str, int] = {}

    def submit(step: str) -> None:
        answer = helper(profile, 'submit', str(len(submitted)), str(BATCH))
        submitted.extend(answer['pks'])
        in_flight[step] = answer['in_flight']

    def incr() -> None:
        profile.verdi('daemon', 'incr', '1')
        wait_until(lambda: _workers_consuming(profile, 3), timeout=60, interval=0.2, what='a third worker to consume')

    def decr() -> None:
        profile.verdi('daemon', 'decr', '1')
        wait_until(lambda: _workers_consuming(profile, 2), timeout=60, interval=0.2, what='the decr to leave two')

    def restart_cli() -> None:
        workers, before = profile.worker_pids(), _hook_lines(profile)
        profile.verdi('daemon', 'restart')
        _assert_broker_outlived(profile, workers, before)

    def restart_api() -> None:
        helper(profile, 'restart-api')

    def stop_start() -> None:
        _stop_and_check_nothing_left(profile, seen)
        # Submitted while the daemon is down: into the store, run after the start.
        submit('while stopped')
        profile.daemon_start(2)

    actions: dict[str, Callable[[], None]] = {
        'verdi daemon incr 1': incr,
        'verdi daemon decr 1': decr,
        'verdi daemon restart': restart_cli,
        'DaemonClient.restart_daemon()': restart_api,
        'verdi daemon stop + start': stop_start,
    }
    steps = [(step, actions[step]) for step in chosen]
    timings: dict[str, float] = {}
    for step, action in steps:
        submit(step)
        started = time.monotonic()
        action()
        status = _assert_broker_up(profile, step, seen)
        workers = 3 if step == 'verdi daemon incr 1' else 2
        wait_until(
            lambda: _workers_consuming(profile, workers),  # noqa: B023 (called within this iteration only)
            timeout=60,
            interval=0.2,
            what=f'the workers to consume after {step}',
        )
        timings[step] = time.monotonic() - started
        assert status['dead_letters'] == 0, f'dead letters after {step}: {status}'
        for endpoint in status.get('endpoints', []):
            if endpoint.startswith('ipc://'):
                sockets.add(endpoint[len('ipc://') :])

    answer = profile.driver('wait', *map(str, submitted), '--timeout', '180', timeout=240)
    assert answer['pending'] == [], f'not terminated in time: {answer["pending"]}'
    failed = {pk: state for pk, state in answer['states'].items() if not state['ok']}
    assert not failed, f'processes not finished ok: {failed}'
    assert [answer['states'][str(pk)]['sum'] for pk in submitted] == [index + 1 for index in range(len(submitted))]
    parents = [answer['states'][str(pk)] for pk in submitted[1::2]]
    assert all(len(parent['children']) == 1 for parent in parents), parents
    assert all(state['exit_status'] == 0 for state in answer['states'].values())
    status = profile.broker_status()
    assert status['dead_letters'] == 0 and status['queues'][profile.info()['queue']]['depth'] == 0, status

    _record('daemon_cycles', {'workflows': len(submitted), 'in_flight': in_flight, 'step_s': timings})
    print(f'\nwork chains: {len(submitted)} (+{len(submitted) // 2} children); in flight per step: {in_flight}')
    print('step to broker up and workers consuming (s): ' + ', '.join(f'{k}: {v:.1f}' for k, v in timings.items()))
    # Work was in flight at every step, or the test proves nothing.
    assert all(count > 0 for count in in_flight.values()), in_flight

    _stop_and_check_nothing_left(profile, seen)
    leftover_sockets = [path for path in sockets if Path(path).exists()]
    assert not leftover_sockets, f'broker sockets left after the stop: {leftover_sockets}'
    _assert_nothing_to_repair(profile)


def _assert_nothing_to_repair(profile: AiidaZmqProfile) -> None:
    """``verdi process repair`` finds no task missing, duplicated or left over, beyond aiida-core's own limit.

    That limit: a calcfunction running inside a worker that stops stays ``Created`` for ever (calcfunctions have no
    checkpoint; the work chain that called it runs that step again from its checkpoint and calls a new one), and
    repair lists it as an active process without a task, whatever the broker. Anything else is the broker's fault.
    """
    repair = profile.verdi('process', 'repair', '--dry-run', check=False)
    output = repair.stdout + repair.stderr
    if 'No inconsistencies' in repair.stdout:
        return
    assert 'duplicates' not in output and 'tasks for terminated processes' not in output, output
    marker = 'There are active processes without process task: {'
    assert marker in output, output
    orphans = [int(pk) for pk in output.split(marker, 1)[1].split('}', 1)[0].split(',')]
    described = helper(profile, 'describe', *map(str, orphans))['processes']
    not_limit = {
        pk: process
        for pk, process in described.items()
        if not (process['calcfunction'] and process['state'] == 'created' and process['caller_finished_ok'])
    }
    assert not not_limit, f'active processes without a task that are not interrupted calcfunctions: {not_limit}'
    print(f'repair: {len(orphans)} calcfunction(s) interrupted by a worker stop left Created (aiida-core limit)')


def _log(profile: AiidaZmqProfile, name: str) -> str:
    """A watcher's FileStream log in the daemon's log directory ('' while it does not exist)."""
    paths = list((profile.aiida_path / '.aiida').rglob(f'{name}.log'))
    return '\n'.join(path.read_text(errors='replace') for path in paths)


def _peer_timeout(profile: AiidaZmqProfile) -> float:
    """The broker's ``--peer-timeout`` (not a profile option: the daemon's broker runs with the default)."""
    pid = profile.broker_pid()
    assert pid is not None
    argv = psutil.Process(pid).cmdline()
    return float(argv[argv.index('--peer-timeout') + 1]) if '--peer-timeout' in argv else 10.0


def test_killed_worker_tasks_handed_over_by_events_plugin(cycles_profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """A worker SIGKILLed with running processes: circus reaps it, the events plugin tells the broker, and the other
    worker holds its tasks long before the broker's peer timeout would have noticed."""
    profile = cycles_profile
    if profile.daemon_pid() is None:
        profile.daemon_start(2)
    peer_timeout = _peer_timeout(profile)
    hold = tmp_path / 'hold'
    hold.touch()
    pks = profile.driver('submit-held', '6', str(hold))['pks']
    holders = profile.task_holders
    wait_until(lambda: sum(holders().values()) == len(pks), timeout=60, interval=0.2, what='all tasks to be held')

    def jobs_running() -> bool:
        states = profile.driver('states', *map(str, pks))['states']
        return all(state['job_state'] == 'running' for state in states.values())

    # The jobs run (and wait for the hold file): the processes are mid-run, checkpointed, not being uploaded.
    wait_until(jobs_running, timeout=90, interval=0.5, what=f'the held jobs {pks} to run')
    before = holders()
    victim, held = max(before.items(), key=lambda item: item[1])
    survivors = set(profile.worker_pids()) - {victim}
    assert held > 0 and survivors, before

    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in {client['pid'] for client in profile.broker_status()['clients']},
        timeout=peer_timeout * 0.5,
        interval=0.02,
        what=f'the broker to drop the killed worker {victim} (well before its {peer_timeout} s peer timeout)',
    )
    dropped_s = time.monotonic() - killed
    now_held = wait_until(
        lambda: (lambda h: h if victim not in h and sum(h.values()) == len(pks) else None)(holders()),
        timeout=60,
        interval=0.02,
        what='the tasks of the killed worker to be held by another',
    )
    handed_over_s = time.monotonic() - killed
    by = 'the surviving worker' if set(now_held) <= survivors else f'workers {sorted(now_held)}'
    print(
        f'\nworker {victim} holding {held} task(s) SIGKILLed: dropped by the broker after {dropped_s:.2f} s, '
        f'all {len(pks)} tasks held by {by} after {handed_over_s:.2f} s (peer timeout {peer_timeout} s)'
    )
    _record('worker_kill_events_plugin', {'dropped_s': dropped_s, 'handed_over_s': handed_over_s, 'held': held})
    assert handed_over_s < peer_timeout, f'handed over after {handed_over_s:.2f} s: the heartbeat did it, not circus'

    # The evidence that it was the events plugin: its line, and the broker's peer-gone line, for this pid.
    events_line = f'process {victim} of aiida-{profile.name} reaped: the broker dropped 1 session(s)'
    wait_until(
        lambda: events_line in _log(profile, watcher_name(profile.name, 'events')),
        timeout=10,
        interval=0.1,
        what=f'the events plugin log to say {events_line!r}',
    )
    assert f'its process {victim} exited, {held} held task(s) go back' in _log(profile, profile.watcher)

    hold.unlink()
    answer = profile.driver('wait', *map(str, pks), '--timeout', '90', timeout=120)
    assert answer['pending'] == [], answer
    assert all(state['ok'] for state in answer['states'].values()), answer['states']
    assert sorted(state['sum'] for state in answer['states'].values()) == [index + 1 for index in range(len(pks))]
    wait_until(lambda: len(profile.worker_pids()) == 2, timeout=30, interval=0.2, what='circus to replace the worker')
