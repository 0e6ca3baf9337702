"""Which process each task is for, and why a process does not move: ``aiida-zmq tasks list`` and ``explain`` on a
real ``core.sqlite_dos`` profile, its daemon and broker run (and stopped) as a user runs them."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
from aiida_profile import AiidaZmqProfile

from aiida_zmq.testing import wait_until


def test_tasks_list_names_the_process_and_its_state(aiida_zmq_profile_factory) -> None:
    """Issue 22.5: a task's row says which process it is for and, for a profile, the process's state in AiiDA."""
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    pks = profile.driver('submit', 'add', '2')['pks']  # no daemon: the tasks wait in the store
    rows = json.loads(profile.aiida_zmq('tasks', 'list', '-p', profile.name, '--json').stdout)
    assert [(row['process'], row['process_state']) for row in rows] == [(pk, 'Created') for pk in pks], rows
    text = profile.aiida_zmq('tasks', 'list', '-p', profile.name).stdout
    header, *lines = text.splitlines()
    assert 'process' in header and 'process state' in header, text
    for pk, line in zip(pks, lines, strict=True):
        assert line.split()[5:7] == [str(pk), 'Created'], text
    # Only a data directory: the process is named, its state is not known (no profile to read).
    rows = json.loads(profile.aiida_zmq('tasks', 'list', '--data-dir', str(profile.data_dir), '--json').stdout)
    assert [row['process'] for row in rows] == pks and all('process_state' not in row for row in rows), rows


def _explain(profile: AiidaZmqProfile, *pks: int) -> dict[str, dict]:
    return json.loads(profile.aiida_zmq('explain', '-p', profile.name, '--json', *map(str, pks)).stdout)


def _case(profile: AiidaZmqProfile, pk: int) -> str:
    return _explain(profile, pk)[str(pk)]['case']


def test_explain_with_the_daemon_stopped(aiida_zmq_profile_factory) -> None:
    """Issue 23.1, the daemon (and so the broker) stopped: a submitted process waits for the daemon; a process with
    no task waits for the daemon, then for repair; a finished process with a task left is safe to drop; a finished one
    without is not stuck. All read from the broker's store and AiiDA's storage."""
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    (waiting,) = profile.driver('submit', 'add', '1')['pks']
    zombie = profile.driver('make-zombie')['pk']
    finished, other = (int(pk) for pk in profile.driver('run')['states'])
    profile.driver('send-continue', str(finished))  # a task for a sealed process: into the store
    answer = _explain(profile, waiting, zombie, finished, other)
    assert [answer[str(pk)]['case'] for pk in (waiting, zombie, finished, other)] == [
        'daemon-not-running',
        'daemon-not-running',
        'sealed-with-task',
        'terminated',
    ], answer
    assert 'verdi daemon start' in answer[str(waiting)]['sentence']
    assert answer[str(waiting)]['tasks'][0]['state'] == 'ready' and not answer[str(waiting)]['broker_running']
    assert 'verdi process repair' in answer[str(zombie)]['sentence'] and not answer[str(zombie)]['tasks']
    assert 'safe to drop' in answer[str(finished)]['sentence']
    text = profile.aiida_zmq('explain', '-p', profile.name, str(waiting)).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f'Process {waiting} (AddWorkChain): Created, not sealed, last change '), text
    assert any(line.strip().startswith('task ') and 'ready' in line for line in lines), text
    assert 'daemon not running, broker not running' in text and lines[-2].startswith('=> The daemon is not'), text


@pytest.mark.timeout(900)  # a daemon, a job, a 30 s peer timeout, on a loaded machine: beyond the default 300 s
# Open bug, found by two fresh-clone CI runs and reproduced with this file alone: after this test's SIGSTOP and
# SIGKILL of the worker, circus starts a second stats streamer, and at `verdi daemon stop` the first one, the broker
# and its two plugins are left running (circusd exits, reporting every watcher stopped). The session fixture's check
# then fails whatever test ran last in the worker. Kept as a long variant until the cause is found.
@pytest.mark.slow
def test_explain_with_the_daemon_running(aiida_zmq_profile_factory, tmp_path) -> None:
    """Issue 23.1 with a daemon of one worker of two slots, each case produced for real: a process with no task, a
    parent waiting on its child, the child running in the worker, a third waiting for a free slot; then the worker
    frozen (SIGSTOP): held by a worker that went silent; past the peer timeout, with one delivery allowed, the task is
    dead-lettered."""
    profile: AiidaZmqProfile = aiida_zmq_profile_factory()
    profile.aiida_zmq('configure', profile.name, '--set', 'max_deliveries=1', '--set', 'peer_timeout=30')
    profile.verdi('config', 'set', 'daemon.worker_process_slots', '2')
    profile.daemon_start(1)
    (worker,) = profile.worker_pids()
    hold = tmp_path / 'hold'
    hold.touch()
    try:
        zombie = profile.driver('make-zombie')['pk']
        answer = _explain(profile, zombie)[str(zombie)]
        assert answer['case'] == 'no-task' and 'verdi process repair' in answer['sentence'], answer

        (parent,) = profile.driver('submit-held-parent', '1', str(hold))['pks']

        def child_running() -> int | None:
            children = profile.driver('states', str(parent))['states'][str(parent)]['children']
            return children[0] if children and _case(profile, children[0]) == 'running' else None

        child = wait_until(child_running, timeout=90, interval=0.5, what='the child job to run in the worker')
        answer = _explain(profile, parent, child)
        assert answer[str(parent)]['case'] == 'waiting-on-children', answer[str(parent)]
        assert f'{child} (' in answer[str(parent)]['sentence'], answer[str(parent)]
        assert f'worker pid {worker}' in answer[str(child)]['sentence'], answer[str(child)]
        assert answer[str(child)]['rpc_owner']['pid'] == worker, answer[str(child)]

        (third,) = profile.driver('submit-held', '1', str(hold))['pks']
        answer = wait_until(
            lambda: (a := _explain(profile, third)[str(third)])['case'] == 'waiting-for-slot' and a,
            timeout=30,
            what='the third process to wait for a slot',
        )
        assert '1 worker(s) hold 2 of 2 slots' in answer['sentence'], answer
        assert answer['workers'] == [{'pid': worker, 'slots': 2, 'held': 2}], answer

        os.kill(worker, signal.SIGSTOP)
        answer = wait_until(
            lambda: (a := _explain(profile, child)[str(child)])['case'] == 'holder-gone' and a,
            timeout=40,
            interval=1,
            what='the frozen worker to be named',
        )
        assert f'aiida-zmq tasks requeue --pid {worker}' in answer['sentence'], answer
        answer = wait_until(
            lambda: (a := _explain(profile, child)[str(child)])['case'] == 'dead-lettered' and a,
            timeout=60,
            interval=1,
            what='the task of the frozen worker to be dead-lettered (peer timeout 30 s, max_deliveries 1)',
        )
        task_id = answer['tasks'][0]['id']
        assert f'aiida-zmq dead-letter requeue {task_id}' in answer['sentence'], answer
        assert [event['event'] for event in answer['tasks'][0]['events']][-2:] == ['given back', 'dead-lettered']
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        hold.unlink(missing_ok=True)
