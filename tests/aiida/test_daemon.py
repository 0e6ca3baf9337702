"""End to end: a real AiiDA daemon (two workers) on a ``core.sqlite_dos`` profile with the ``zmq`` broker.

The tests of this module share one profile and run in order; each leaves the daemon running with two workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import psutil
import pytest
from aiida_profile import DRIVER, AiidaZmqProfile

from aiida_zmq.testing import wait_until

pytestmark = pytest.mark.aiida

WORKFLOWS = 100
QUICK_WORKFLOWS = 30  # the default run's; WORKFLOWS with --run-slow
FIGURES = Path(os.environ.get('AIIDA_ZMQ_FIGURES', '')) if os.environ.get('AIIDA_ZMQ_FIGURES') else None


def _record(name: str, value: dict) -> None:
    """Append a measured figure to ``$AIIDA_ZMQ_FIGURES`` (JSON lines), when set: the figures of the notes."""
    if FIGURES is not None:
        with FIGURES.open('a') as stream:
            stream.write(json.dumps({'figure': name, **value}) + '\n')


def _assert_all_ok(answer: dict) -> None:
    assert answer.get('pending', []) == [], f'not terminated in time: {answer["pending"]}'
    failed = {pk: state for pk, state in answer['states'].items() if not state['ok']}
    assert not failed, f'processes not finished ok: {failed}'


def test_offline_submit_then_daemon_start(aiida_zmq_profile_factory) -> None:
    """With neither daemon nor broker, ``submit()`` stores the task, ``run()`` works, and the daemon runs the task."""
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    assert profile.broker_pid() is None

    status = profile.verdi('status', check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert 'broker not running' in status.stdout and 'daemon start' in status.stdout, status.stdout

    submitted = profile.driver('submit', 'mixed', '4')
    ran = profile.driver('run')
    _assert_all_ok(ran)
    assert sorted(state['sum'] for state in ran['states'].values()) == [5, 9]

    # The tasks wait in the store, and ``verdi process repair`` (daemon stopped) sees them: nothing to repair.
    repair = profile.verdi('process', 'repair', '--dry-run', check=False)
    assert 'No inconsistencies' in repair.stdout, repair.stdout + repair.stderr
    states = profile.driver('states', *map(str, submitted['pks']))['states']
    assert all(state['state'] == 'created' for state in states.values()), states

    profile.daemon_start(2)
    answer = profile.driver('wait', *map(str, submitted['pks']), '--timeout', '120')
    _assert_all_ok(answer)
    assert [answer['states'][str(pk)]['sum'] for pk in submitted['pks']] == [index + 1 for index in range(4)]
    profile.daemon_stop()
    assert not profile.processes(), 'processes left running after `verdi daemon stop`'


def test_repair_on_a_profile_whose_daemon_never_ran(aiida_zmq_profile_factory) -> None:
    """``verdi process repair`` with something to fix on a profile whose broker never ran: no data directory yet
    (reading the queue took the store's lock in a directory that did not exist: ``FileNotFoundError``)."""
    profile = aiida_zmq_profile_factory()
    zombie = profile.driver('make-zombie')['pk']
    store_file = Path(profile.info()['data_dir']) / 'tasks.sqlite3'
    assert not store_file.exists()
    repair = profile.verdi('process', 'repair', check=False)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert 'There are active processes without process task' in repair.stdout, repair.stdout
    assert f'Revived process `{zombie}`' in repair.stdout, repair.stdout
    assert store_file.exists()  # the revived task waits in the store for the daemon
    again = profile.verdi('process', 'repair', '--dry-run', check=False)
    assert 'No inconsistencies' in again.stdout, again.stdout + again.stderr


_ATTACH = """
import sys
from aiida import load_profile
from aiida.manage import get_manager
load_profile(sys.argv[1])
try:
    get_manager().get_broker().ensure_broker()
except ConnectionError as exception:
    print('refused:', exception)
"""


def test_a_daemon_nobody_can_reach_is_named_at_once(aiida_zmq_profile_factory) -> None:
    """aiida-core removes a daemon's socket directory when circus refuses its ``quit`` (circus still starts its
    watchers), and the arbiter runs on where nobody can reach it. Attaching the broker then says so, with the pid to
    stop, instead of "Timed out" after ``start_timeout`` (30 s) for each worker circus starts; ``status`` says so."""
    profile = aiida_zmq_profile_factory(workers=1)
    pid = profile.daemon_pid()
    sockets = Path(profile.circus_endpoint()[len('ipc://') :]).parent
    hidden = sockets.with_name(sockets.name + '-hidden')
    sockets.rename(hidden)  # what aiida-core's stop_daemon does after a refused quit
    try:
        started = time.monotonic()
        attach = profile.run(sys.executable, '-c', _ATTACH, profile.name)
        elapsed = time.monotonic() - started
        assert f'control socket {sockets}/circus.c.sock is gone' in attach.stdout, attach.stdout + attach.stderr
        assert f'`kill {pid}`' in attach.stdout and f'verdi -p {profile.name} daemon start' in attach.stdout
        assert elapsed < 20, f'the answer took {elapsed:.1f}s'  # the timeout it no longer waits for is 30 s
        status = profile.aiida_zmq('status', '--profile', profile.name, check=False)
        assert f'`kill {pid}`' in status.stdout, status.stdout + status.stderr
    finally:
        hidden.rename(sockets)
        assert not profile.teardown(), 'processes were left running after `verdi daemon stop`'


def test_verdi_status_green(aiida_zmq_profile: AiidaZmqProfile) -> None:
    status = aiida_zmq_profile.verdi('status')
    broker_line = next(line for line in status.stdout.splitlines() if 'broker:' in line)
    assert '\u2714' in broker_line and f'PID {aiida_zmq_profile.broker_pid()}' in broker_line, status.stdout


def test_broker_watcher_in_daemon(aiida_zmq_profile: AiidaZmqProfile) -> None:
    """The broker is a watcher of the daemon's arbiter, and its probe reports the workers as consumers."""
    profile = aiida_zmq_profile
    assert profile.watcher_pids(profile.watcher) == [profile.broker_pid()]
    # Its log has a name of its own in the daemon log directory that every profile shares (issue 15).
    log_dir = profile.aiida_path / '.aiida' / 'daemon' / 'log'
    assert (log_dir / f'zmq-broker-{profile.name}.log').exists(), sorted(path.name for path in log_dir.iterdir())
    # `aiida-zmq status` names the daemon's arbiter and the circusctl line to paste.
    answer = json.loads(profile.aiida_zmq('status', '--profile', profile.name, '--json').stdout)
    assert answer['circus']['endpoint'] == profile.circus_endpoint()
    assert answer['circus']['watcher'] == profile.watcher
    assert answer['circus']['circusctl'].endswith(f'--endpoint {profile.circus_endpoint()} status')
    probe = profile.driver('info')  # loads the profile: the probe below goes through the same broker plugin
    assert probe['queue'].endswith('.process.queue')
    status = profile.broker_status()
    queue = status['queues'][profile.info()['queue']]
    assert queue['consumers'] == 2, status


@pytest.mark.parametrize('workflows', [QUICK_WORKFLOWS, pytest.param(WORKFLOWS, marks=pytest.mark.slow)])
def test_hundred_workflows(aiida_zmq_profile: AiidaZmqProfile, workflows: int) -> None:
    """100 work chains (30 in the default run): half call a calcfunction, half submit such a work chain as a child and
    wait for it. The figures of docs/aiida.md come from the 100 (``--run-slow``)."""
    answer = aiida_zmq_profile.driver('submit', 'mixed', str(workflows), '--wait', '240', timeout=300)
    _assert_all_ok(answer)
    sums = [answer['states'][str(pk)]['sum'] for pk in answer['pks']]
    assert sums == [index + 1 for index in range(workflows)]
    parents = [answer['states'][str(pk)] for pk in answer['pks'][1::2]]
    assert all(len(parent['children']) == 1 for parent in parents)
    figures = {
        'workflows': workflows,
        'workflows_per_s': workflows / answer['elapsed_s'],
        'submit_calls_per_s': workflows / answer['submit_s'],
    }
    _record('hundred_workflows', figures)
    print(f'\nend to end: {figures}')
    status = aiida_zmq_profile.broker_status()
    assert status['dead_letters'] == 0
    assert status['queues'][aiida_zmq_profile.info()['queue']]['depth'] == 0


def _wait_job_running(profile: AiidaZmqProfile, pks: list[int]) -> None:
    def running() -> bool:
        states = profile.driver('states', *map(str, pks))['states']
        return all(state['job_state'] == 'running' for state in states.values())

    wait_until(running, timeout=60, interval=0.5, what=f'the held jobs {pks} to run')


# Dozens of subprocesses in sequence (verdi, the driver), each loading AiiDA: under 90 s at load 6, 260-330 s beside
# stress-ng --cpu 2 on two busy cores, past pytest-timeout's 300 s. Every wait inside has its own bound.
@pytest.mark.timeout(900)
def test_kill_pause_play(aiida_zmq_profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """``verdi process kill/pause/play/status`` on processes a worker runs (RPCs through the broker).

    Pause and play go to a work chain that waits for a held job, not to the job itself: aiida-core 2.9 fails a job
    paused while it waits for its scheduler poll (``Expected pending job info future, found in done state``, the
    cancelled poll request stays in the worker's jobs list), whatever the broker.
    """
    profile = aiida_zmq_profile
    hold = tmp_path / 'hold'
    hold.touch()
    (to_kill,) = profile.driver('submit-held', '1', str(hold))['pks']
    _wait_job_running(profile, [to_kill])
    killed = profile.verdi('process', 'kill', str(to_kill), '--timeout', '30')
    assert 'processed' in killed.stdout, killed.stdout
    answer = profile.driver('wait', str(to_kill), '--timeout', '30')
    assert answer['states'][str(to_kill)]['state'] == 'killed', answer

    (to_pause,) = profile.driver('submit-held-parent', '1', str(hold))['pks']

    def job_running() -> bool:
        children = profile.driver('states', str(to_pause))['states'][str(to_pause)]['children']
        return (
            bool(children)
            and profile.driver('states', *map(str, children))['states'][str(children[0])]['job_state'] == 'running'
        )

    wait_until(job_running, timeout=60, interval=0.5, what='the job of the work chain to run')
    profile.verdi('process', 'pause', str(to_pause), '--timeout', '30')
    assert profile.driver('states', str(to_pause))['states'][str(to_pause)]['paused'] is True
    status = profile.verdi('process', 'status', str(to_pause))
    assert f'<{to_pause}>' in status.stdout, status.stdout

    hold.unlink()
    (job,) = profile.driver('states', str(to_pause))['states'][str(to_pause)]['children']
    assert profile.driver('wait', str(job), '--timeout', '60')['states'][str(job)]['ok'] is True
    # Paused, the work chain does not act on its job's end: it stays paused until played.
    assert profile.driver('states', str(to_pause))['states'][str(to_pause)]['paused'] is True

    # ``verdi process watch`` gets the state changes by broadcast: subscribed (the broker says so), then played.
    watch = subprocess.Popen(
        [str(Path(sys.executable).parent / 'verdi'), '-p', profile.name, 'process', 'watch', str(to_pause)],
        env={**profile.env, 'PYTHONFAULTHANDLER': '1'},  # SIGABRT then prints every thread's stack (see _interrupt)
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watched = ''
    try:
        wait_until(
            lambda: any(c['pid'] == watch.pid and c['subscribed'] for c in profile.broker_status()['clients']),
            timeout=30,
            interval=0.2,
            what='`verdi process watch` to subscribe to broadcasts',
        )
        profile.verdi('process', 'play', str(to_pause), '--timeout', '30')
        answer = profile.driver('wait', str(to_pause), '--timeout', '60')
    finally:
        watched = _interrupt(watch)
    assert f'Process<{to_pause}> [state_changed.' in watched and '.finished|' in watched, watched
    report = profile.verdi('process', 'report', str(to_pause), check=False).stdout
    assert answer['states'][str(to_pause)]['ok'] is True, f'{answer}\n{report}'
    assert answer['states'][str(to_pause)]['sum'] == 1


def _interrupt(watch: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """Ctrl-C ``watch`` and return its output; it must exit within ``timeout``.

    Should it not (issue 22.1: seen once in a full run on a loaded machine, not reproduced since), the failure shows
    every thread's stack (faulthandler, on SIGABRT) and the process is killed, so that no later test of the module
    finds it still running.
    """
    watch.send_signal(signal.SIGINT)
    try:
        return watch.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        pass
    watch.send_signal(signal.SIGABRT)
    try:
        output = watch.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        watch.kill()
        output = watch.communicate()[0]
    raise AssertionError(f'`verdi process watch` did not exit within {timeout:.0f} s of SIGINT; its threads:\n{output}')


KILL_ANSWER_BOUND = 60
"""Seconds verdi waits for the kill's answer (``--timeout``); the measured time is a figure, not a bound."""


def _kill_answered(profile: AiidaZmqProfile, parent: int, hold: Path) -> float:
    """Wait until the parent's job runs, ``verdi process kill`` it, and return how long the kill took to be answered."""

    def job_running() -> bool:
        children = profile.driver('states', str(parent))['states'][str(parent)]['children']
        job_states = profile.driver('states', *map(str, children))['states'] if children else {}
        return any(state['job_state'] == 'running' for state in job_states.values())

    wait_until(job_running, timeout=60, interval=0.5, what=f'the job of work chain {parent} to run')
    started = time.monotonic()
    # verdi's own bound on the answer, generous for a loaded machine: the bug was an answer that never came (without
    # ``-t`` a hang), not a slow one; how fast it comes is a figure (``_record``), not an assertion.
    killed = profile.verdi('process', 'kill', str(parent), '--timeout', str(KILL_ANSWER_BOUND), check=False)
    elapsed = time.monotonic() - started
    assert 'processed' in killed.stdout and 'timed out' not in killed.stdout, killed.stdout + killed.stderr
    return elapsed


@pytest.mark.parametrize('kind', ['finished-and-running-child', 'running-child'])
def test_kill_work_chain_with_children(aiida_zmq_profile: AiidaZmqProfile, tmp_path: Path, kind: str) -> None:
    """``verdi process kill`` of a work chain whose children are finished or running is answered, and kills them.

    aiida-core's ``Process.kill`` sends a kill to every child and relies on ``rpc_send`` raising ``UnroutableError``
    from the call for a child that has finished: answered as a failed future instead, the gathered kills failed and
    the answer to ``verdi`` never came ("timed out", and without ``-t`` a hang) though the node became KILLED.
    """
    profile = aiida_zmq_profile
    hold = tmp_path / 'hold'
    hold.touch()
    command = 'submit-two-children' if kind == 'finished-and-running-child' else 'submit-held-parent'
    (parent,) = profile.driver(command, '1', str(hold))['pks']
    elapsed = _kill_answered(profile, parent, hold)
    states = profile.driver('wait', str(parent), '--timeout', '60')['states']
    children = states[str(parent)]['children']
    child_states = profile.driver('wait', *map(str, children), '--timeout', '60')['states']
    _record(f'kill_{kind}', {'answered_s': round(elapsed, 2)})
    assert elapsed < KILL_ANSWER_BOUND + 30, f'verdi process kill took {elapsed:.1f}s to return'
    assert states[str(parent)]['state'] == 'killed', states
    expected = {'finished-and-running-child': ['finished', 'killed'], 'running-child': ['killed']}[kind]
    assert [child_states[str(child)]['state'] for child in children] == expected, child_states


@pytest.mark.slow
def test_kill_work_chain_with_a_finished_child_twenty_times(aiida_zmq_profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """Twenty kills in a row are each answered (the issue's 5 s figure is recorded: ``kill_twenty``)."""
    profile = aiida_zmq_profile
    hold = tmp_path / 'hold'
    hold.touch()
    times = []
    for _ in range(20):
        (parent,) = profile.driver('submit-two-children', '1', str(hold))['pks']
        times.append(_kill_answered(profile, parent, hold))
        assert profile.driver('wait', str(parent), '--timeout', '60')['states'][str(parent)]['state'] == 'killed'
    _record('kill_twenty', {'answered_s': [round(t, 2) for t in times], 'max_s': round(max(times), 2)})
    assert max(times) < KILL_ANSWER_BOUND + 30, times


def test_worker_killed_mid_run(aiida_zmq_profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """A worker killed with SIGKILL while it holds running jobs: another worker finishes them."""
    profile = aiida_zmq_profile
    hold = tmp_path / 'hold'
    hold.touch()
    pks = profile.driver('submit-held', '6', str(hold))['pks']
    holders = profile.task_holders
    wait_until(lambda: sum(holders().values()) == len(pks), timeout=60, interval=0.2, what='all tasks to be held')

    _wait_job_running(profile, pks)
    victim, held = max(holders().items(), key=lambda item: item[1])
    assert held > 0 and victim in profile.worker_pids()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == 'zombie', timeout=10)

    # Its tasks go to the other worker (or to the one circus starts in its place), which resumes the jobs.
    wait_until(
        lambda: victim not in holders() and sum(holders().values()) == len(pks),
        timeout=60,
        interval=0.2,
        what='the tasks of the killed worker to be held by another',
    )
    hold.unlink()
    answer = profile.driver('wait', *map(str, pks), '--timeout', '90')
    _assert_all_ok(answer)
    assert sorted(state['sum'] for state in answer['states'].values()) == [index + 1 for index in range(len(pks))]
    wait_until(lambda: len(profile.worker_pids()) == 2, timeout=30, what='circus to replace the worker')


def _session_across_a_daemon_stop(
    profile: AiidaZmqProfile, tmp_path: Path, *command: str, meanwhile: t.Callable[[], t.Any] = lambda: None
) -> tuple[str, dict]:
    """Run a :mod:`zmq_test_driver` session that connects while the daemon runs and goes on once told to, after
    ``verdi daemon stop`` and ``meanwhile``; return how it described its communicator when ready, and its answer."""
    ready, go = tmp_path / 'ready', tmp_path / 'go'
    session = subprocess.Popen(
        [sys.executable, str(DRIVER), profile.name, *command, str(ready), str(go)],
        env=profile.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(ready.exists, timeout=60, interval=0.1, what='the session to connect')
        described = ready.read_text()
        profile.daemon_stop()
        meanwhile()
        go.touch()
        out, err = session.communicate(timeout=90)
    finally:
        if session.poll() is None:
            session.kill()
            session.communicate()
    assert session.returncode == 0, err
    return described, json.loads(out.splitlines()[-1])


def test_session_submits_after_daemon_stop(aiida_zmq_profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """A session connected while the daemon ran goes on submitting after ``verdi daemon stop``, without waiting."""
    profile = aiida_zmq_profile
    described, answer = _session_across_a_daemon_stop(profile, tmp_path, 'session', '3')
    assert 'ProfileCommunicator' in described and 'online' in described, described
    # Without the fallback each submit waited a minute for the dead broker to confirm the process's RPC subscription.
    assert answer['submit_s'] < 10, answer

    profile.daemon_start(2)
    result = profile.driver('wait', *map(str, answer['pks']), '--timeout', '60')
    _assert_all_ok(result)


def test_repair_in_a_session_after_the_daemon_stopped(aiida_zmq_profile: AiidaZmqProfile, tmp_path: Path) -> None:
    """``verdi process repair``'s calls in an interpreter that connected while the daemon ran, after it stopped: the
    task queue is read from the store (it waited 5 s for the dead broker, then raised ``TimeoutError``), the task of a
    terminated process is acknowledged there, and a zombie is revived into the store, to run once the daemon starts."""
    profile = aiida_zmq_profile
    (finished,) = profile.driver('submit', 'add', '1', '--wait', '60')['pks']
    made: dict[str, int] = {}

    def make_things_to_fix() -> None:
        profile.driver('send-continue', str(finished))  # a task for a terminated process
        (made['pending'],) = profile.driver('submit', 'add', '1')['pks']  # an active process with its task
        made['zombie'] = profile.driver('make-zombie')['pk']  # an active process without one

    described, answer = _session_across_a_daemon_stop(profile, tmp_path, 'repair-session', meanwhile=make_things_to_fix)
    assert 'online' in described, described
    pending, zombie = made['pending'], made['zombie']
    assert 'offline' in answer['communicator'], answer
    assert sorted(answer['tasks']) == sorted([finished, pending]), answer
    assert answer['acknowledged'] == [finished] and answer['revived'] == [zombie], answer
    assert sorted(answer['tasks_after']) == sorted([pending, zombie]), answer
    assert answer['elapsed_s'] < 10, answer

    # The zombie's node has no checkpoint to continue from: end it, so that its revived task finds it terminated.
    profile.driver('bury', str(zombie))
    profile.daemon_start(2)
    _assert_all_ok(profile.driver('wait', str(pending), '--timeout', '60'))
    queue = profile.info()['queue']
    wait_until(
        lambda: (
            (status := profile.broker_status())['queues'][queue]['depth'] == 0
            and not any(client['held'] for client in status['clients'])
        ),
        timeout=60,
        interval=0.2,
        what='the revived task to be taken and acknowledged',
    )


def test_repair_then_stop_leaves_nothing(aiida_zmq_profile: AiidaZmqProfile) -> None:
    """After all of the above: ``verdi process repair`` finds nothing, ``verdi daemon stop`` leaves no process."""
    profile = aiida_zmq_profile
    broker_pid = profile.broker_pid()
    assert broker_pid is not None
    profile.daemon_stop()
    wait_until(lambda: not profile.processes(), timeout=20, interval=0.2, what='every daemon process to exit')
    assert not psutil.pid_exists(broker_pid) or psutil.Process(broker_pid).status() == 'zombie'

    repair = profile.verdi('process', 'repair', '--dry-run', check=False)
    assert 'No inconsistencies' in repair.stdout, repair.stdout + repair.stderr
    probe = profile.verdi('status', check=False)
    assert 'broker not running' in probe.stdout, probe.stdout
    # Leave the daemon running, as the module's fixture expects.
    profile.daemon_start(2)
