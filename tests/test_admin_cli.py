"""The operator's commands: `aiida-zmq status`, `tasks`, `dead-letter`, against a real broker process."""

from __future__ import annotations

import json
import subprocess
import sys

import kiwipy
import pytest
from click.testing import CliRunner

import aiida_zmq
from aiida_zmq.cli import main
from aiida_zmq.testing import wait_until


def run(*args: str, expect: int = 0) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output


def test_status_of_a_running_broker(zmq_broker, zmq_communicator):
    zmq_communicator.task_queue('work').task_send('x', no_reply=True)
    text = run('status', '--data-dir', str(zmq_broker.data_dir))
    assert 'running' in text and f'pid {zmq_broker.pid}' in text
    assert 'work: 1 waiting, 0 consumer(s)' in text
    assert 'aiida-zmq-cli' not in text  # its own session is not shown as a user
    # The zmq_broker fixture's --heartbeat 0.2 --peer-timeout 2, and the defaults.
    assert 'heartbeat 0.2 s, peer timeout 2 s, 20 deliveries before dead-lettering, fsync off' in text
    answer = json.loads(run('status', '--endpoint', zmq_broker.endpoint, '--json'))
    assert answer['running'] is True and answer['queues']['work']['depth'] == 1
    assert answer['round_trip_ms'] > 0


def test_status_of_a_stopped_broker_says_what_to_run(zmq_broker, zmq_communicator):
    zmq_communicator.task_queue('work').task_send('kept', no_reply=True)
    zmq_communicator.close()
    zmq_broker.stop()
    process = subprocess.run(
        [sys.executable, '-m', 'aiida_zmq.cli', 'status', '--data-dir', str(zmq_broker.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 3
    assert 'not running' in process.stdout
    assert f'aiida-zmq serve --data-dir {zmq_broker.data_dir}' in process.stdout
    assert 'work 1' in process.stdout  # what waits in the store is shown all the same


def test_tasks_list_and_purge(zmq_broker, zmq_communicator):
    for number in range(3):
        zmq_communicator.task_queue('work').task_send(number, no_reply=True)
    rows = json.loads(run('tasks', 'list', '--endpoint', zmq_broker.endpoint, '--json'))
    assert [row['state'] for row in rows] == ['ready'] * 3
    assert 'payload' not in rows[0]
    assert 'purged 3 waiting task(s) of work' in run(
        'tasks', 'purge', 'work', '--yes', '--endpoint', zmq_broker.endpoint
    )
    assert json.loads(run('tasks', 'list', '--endpoint', zmq_broker.endpoint, '--json')) == []
    # The purge is final: a consumer arriving now gets nothing, and new tasks still flow.
    got = []
    zmq_communicator.task_queue('work').add_task_subscriber(lambda _c, task: got.append(task))
    zmq_communicator.task_queue('work').task_send('after', no_reply=True)
    wait_until(lambda: got, timeout=5)
    assert got == ['after']


def test_tasks_requeue_from_a_hung_process(zmq_broker):
    producer = aiida_zmq.connect(zmq_broker.endpoint)
    holder = subprocess.Popen(
        [sys.executable, '-m', 'tests.actors', 'hold', zmq_broker.endpoint, 'work'],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == 'ready'
        producer.task_queue('work').task_send('held', no_reply=True)
        wait_until(lambda: producer.admin('status')['queues']['work']['depth'] == 0, timeout=10)
        text = run('tasks', 'requeue', '--pid', str(holder.pid), '--endpoint', zmq_broker.endpoint)
        assert text.startswith('1 task(s) requeued')
    finally:
        holder.kill()
        holder.wait(10)
    # The holder's communicator may have come back and been given the task again before it was killed; either way
    # the task ends up waiting once more, never lost.
    wait_until(lambda: producer.admin('status')['queues']['work']['depth'] == 1, timeout=10)
    producer.close()


def test_dead_letter_commands(zmq_broker_factory):
    broker = zmq_broker_factory('--max-deliveries', '1')
    communicator = aiida_zmq.connect(broker.endpoint)
    queue = communicator.task_queue('work')

    def refuse(_communicator, _task):
        raise kiwipy.TaskRejected('no')

    subscriber = queue.add_task_subscriber(refuse)
    queue.task_send('a', no_reply=True)
    queue.task_send('b', no_reply=True)
    endpoint = ('--endpoint', broker.endpoint)
    wait_until(lambda: len(json.loads(run('dead-letter', 'list', *endpoint, '--json'))) == 2, timeout=10)
    queue.remove_task_subscriber(subscriber)
    letters = json.loads(run('dead-letter', 'list', *endpoint, '--json'))
    assert 'max_deliveries=1' in run('dead-letter', 'list', *endpoint)
    run('dead-letter', 'requeue', *endpoint, expect=2)  # neither ids nor --all: a usage error
    assert 'requeued 1 task(s)' in run('dead-letter', 'requeue', str(letters[0]['id']), *endpoint)
    assert 'dropped 1 task(s)' in run('dead-letter', 'drop', '--all', '--yes', *endpoint)
    assert run('dead-letter', 'list', *endpoint).strip() == 'no dead letters'
    with queue.next_task(timeout=5) as task:
        assert task.body == 'a'
    communicator.close()


def test_unknown_profile_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_PATH', str(tmp_path))
    result = CliRunner().invoke(main, ['status', '--profile', 'nope'])
    assert result.exit_code == 2
    assert 'Give --profile, --data-dir or --endpoint' in result.output


@pytest.mark.parametrize('command', [['status'], ['tasks', 'list'], ['dead-letter', 'list']])
def test_down_endpoint_exits_3(tmp_path, command):
    result = CliRunner().invoke(main, [*command, '--endpoint', f'ipc://{tmp_path}/none.sock'])
    assert result.exit_code == 3
