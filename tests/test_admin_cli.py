"""The operator's commands: `aiida-zmq status`, `tasks`, `dead-letter`, against a real broker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import kiwipy
import pytest
from click.testing import CliRunner

import aiida_zmq
from aiida_zmq.cli.main import main
from aiida_zmq.testing import wait_until


def run(*args: str, expect: int = 0) -> str:
    """Run an ``aiida-zmq`` command; return what it printed to stdout (notes on stderr are not part of an answer)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.stdout


def test_status_of_a_running_broker(zmq_broker, zmq_communicator):
    zmq_communicator.task_queue('work').task_send('x', no_reply=True)
    text = run('status', '--data-dir', str(zmq_broker.data_dir))
    assert 'running' in text and f'pid {zmq_broker.pid}' in text
    assert 'work: 1 waiting, 0 consumers' in text
    assert 'aiida-zmq-cli' not in text  # its own session is not shown as a user
    # The zmq_broker fixture's --heartbeat 0.2 --peer-timeout 2, and the defaults.
    assert 'heartbeat 0.2 s, peer timeout 2 s, 20 deliveries before dead-lettering, fsync on' in text
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
    assert 'Purged 3 waiting tasks of work.' in run(
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
        text = run('tasks', 'requeue', '--pid', str(holder.pid), '--force', '--endpoint', zmq_broker.endpoint)
        assert text.startswith('Requeued 1 task held by 1 session of process')
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
    assert 'Requeued 1 task.' in run('dead-letter', 'requeue', str(letters[0]['id']), *endpoint)
    assert 'Dropped 1 task.' in run('dead-letter', 'drop', '--all', '--yes', *endpoint)
    assert run('dead-letter', 'list', *endpoint).strip() == 'No dead letters.'
    with queue.next_task(timeout=5) as task:
        assert task.body == 'a'
    communicator.close()


def test_unknown_profile_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_PATH', str(tmp_path))
    result = CliRunner().invoke(main, ['status', '--profile', 'nope'])
    assert result.exit_code == 2
    # --profile was given: the message says which profiles there are, not to give --profile.
    assert 'there is no AiiDA profile `nope`' in result.output
    assert '`verdi profile list` shows the profiles; or give --data-dir or --endpoint' in result.output
    assert 'Give --profile' not in result.output
    result = CliRunner().invoke(main, ['status'])
    assert result.exit_code == 2
    assert 'Give --profile, --data-dir or --endpoint' in result.output


@pytest.mark.parametrize('command', [['status'], ['tasks', 'list'], ['dead-letter', 'list']])
def test_down_endpoint_exits_3(tmp_path, command):
    result = CliRunner().invoke(main, [*command, '--endpoint', f'ipc://{tmp_path}/none.sock'])
    assert result.exit_code == 3


def _dead_lettered(broker, count: int) -> None:
    """Make ``count`` dead letters in queue ``work`` (deliveries capped at 1, a subscriber that refuses)."""
    communicator = aiida_zmq.connect(broker.endpoint)
    queue = communicator.task_queue('work')

    def refuse(_communicator, _task):
        raise kiwipy.TaskRejected('no')

    subscriber = queue.add_task_subscriber(refuse)
    for number in range(count):
        queue.task_send(f'dead {number}', no_reply=True)
    wait_until(lambda: communicator.admin('status')['dead_letters'] == count, timeout=10, what='the dead letters')
    queue.remove_task_subscriber(subscriber)
    communicator.close()


def test_admin_commands_work_on_the_store_of_a_stopped_broker(zmq_broker_factory):
    """tasks list/purge and dead-letter list/requeue/drop with the broker stopped: on its store, under its lock."""
    broker = zmq_broker_factory('--max-deliveries', '1')
    _dead_lettered(broker, 3)
    producer = aiida_zmq.connect(broker.endpoint)
    for number in range(2):
        producer.task_queue('other').task_send(number, no_reply=True)
    producer.close()
    broker.stop()
    data_dir = ('--data-dir', str(broker.data_dir))

    rows = json.loads(run('tasks', 'list', *data_dir, '--json'))
    assert sorted(row['state'] for row in rows) == ['dead', 'dead', 'dead', 'ready', 'ready']
    letters = json.loads(run('dead-letter', 'list', *data_dir, '--json'))
    assert [letter['queue'] for letter in letters] == ['work'] * 3
    assert 'max_deliveries=1' in run('dead-letter', 'list', *data_dir)
    assert 'Requeued 1 task.' in run('dead-letter', 'requeue', str(letters[0]['id']), *data_dir)
    assert 'Dropped 1 task.' in run('dead-letter', 'drop', str(letters[1]['id']), '--yes', *data_dir)
    assert 'Purged 2 waiting tasks of other.' in run('tasks', 'purge', 'other', '--yes', *data_dir)
    assert [letter['id'] for letter in json.loads(run('dead-letter', 'list', *data_dir, '--json'))] == [
        letters[2]['id']
    ]
    assert not (broker.data_dir / 'broker.lock').exists()  # the lock was held and given back

    # The broker starts on what the commands left: the requeued task is delivered, the dead letter still there.
    broker.start()
    consumer = aiida_zmq.connect(broker.endpoint)
    with consumer.task_queue('work').next_task(timeout=10) as task:
        assert task.body == 'dead 0'
    assert len(consumer.admin('dead-letters')['dead_letters']) == 1
    consumer.close()


def test_admin_commands_on_a_data_dir_no_broker_ever_used(tmp_path):
    data_dir = ('--data-dir', str(tmp_path / 'never'))
    assert run('tasks', 'list', *data_dir).strip() == 'No stored tasks.'
    assert run('dead-letter', 'list', *data_dir).strip() == 'No dead letters.'
    assert not (tmp_path / 'never').exists()  # looking creates nothing


def test_drop_all_with_no_dead_letters_asks_nothing(zmq_broker, tmp_path):
    for target in (('--endpoint', zmq_broker.endpoint), ('--data-dir', str(tmp_path))):
        result = CliRunner().invoke(main, ['dead-letter', 'drop', '--all', *target], input='')
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith('No dead letters to drop.')
        assert '?' not in result.output


def test_drop_asks_with_the_count(zmq_broker_factory):
    broker = zmq_broker_factory('--max-deliveries', '1')
    _dead_lettered(broker, 2)
    result = CliRunner().invoke(main, ['dead-letter', 'drop', '--all', '--endpoint', broker.endpoint], input='n\n')
    assert 'Delete all 2 dead-lettered tasks for good?' in result.output
    assert result.exit_code == 1  # declined: click's Abort
    assert len(json.loads(run('dead-letter', 'list', '--endpoint', broker.endpoint, '--json'))) == 2


def test_requeue_of_a_live_process_is_refused(zmq_broker):
    """Requeueing the tasks of a worker that still runs them runs them twice (issue 14, item 15): refused."""
    producer = aiida_zmq.connect(zmq_broker.endpoint)
    holder = subprocess.Popen(
        [sys.executable, '-m', 'tests.actors', 'hold', zmq_broker.endpoint, 'work'], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == 'ready'
        producer.task_queue('work').task_send('held', no_reply=True)
        wait_until(lambda: producer.admin('status')['queues']['work']['depth'] == 0, timeout=10)
        result = CliRunner().invoke(
            main, ['tasks', 'requeue', '--pid', str(holder.pid), '--endpoint', zmq_broker.endpoint]
        )
        assert result.exit_code == 1, result.output
        assert f'process {holder.pid} is still running: its tasks would run twice' in result.output
        assert '--force' in result.output
        status = producer.admin('status')
        assert status['queues']['work']['depth'] == 0  # still held by the holder, not handed to anyone else
        assert sum(client['held'] for client in status['clients']) == 1
    finally:
        holder.kill()
        holder.wait(10)
    # Once it is gone, the same command does it (here the broker may have noticed first: 0 or 1 requeued).
    assert run('tasks', 'requeue', '--pid', str(holder.pid), '--endpoint', zmq_broker.endpoint).startswith('Requeued')
    wait_until(lambda: producer.admin('status')['queues']['work']['depth'] == 1, timeout=10)
    producer.close()


def _options(command: click.Command, path: str = 'aiida-zmq') -> Iterator[tuple[str, click.Parameter]]:
    for parameter in command.params:
        yield path, parameter
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f'{path} {name}')


def test_every_option_has_help_text():
    missing = [
        f'{path} {"/".join(parameter.opts)}'
        for path, parameter in _options(main)
        if isinstance(parameter, click.Option) and not parameter.help
    ]
    assert missing == []


def test_configure_an_unknown_profile_is_bad_usage(tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_PATH', str(tmp_path))
    result = CliRunner().invoke(main, ['configure', 'nope'])
    assert result.exit_code == 2, result.output
    assert 'nope' in result.output and '`verdi profile list` shows the profiles' in result.output


def test_migrate_usage_line():
    result = CliRunner().invoke(main, ['migrate', '--help'], prog_name='aiida-zmq')
    assert 'Usage: aiida-zmq migrate [OPTIONS] [SERVER]\n' in result.output, result.output
    assert 'SERVER is `rabbitmq` (the default) or `core.zeromq`.' in ' '.join(result.output.split())  # click rewraps


def test_shell_completion_works_as_documented():
    """docs/reference.md, "Shell completion": the console script completes commands and subcommands (click's)."""
    script = str(Path(sys.executable).parent / 'aiida-zmq')

    def complete(words: str, cword: int) -> str:
        env = {**os.environ, '_AIIDA_ZMQ_COMPLETE': 'bash_complete', 'COMP_WORDS': words, 'COMP_CWORD': str(cword)}
        return subprocess.run([script], env=env, capture_output=True, text=True, timeout=60, check=True).stdout

    assert 'plain,dead-letter' in complete('aiida-zmq dead', 1)
    assert {'plain,list', 'plain,requeue', 'plain,drop'} <= set(complete('aiida-zmq dead-letter ', 2).splitlines())
    env = {**os.environ, '_AIIDA_ZMQ_COMPLETE': 'bash_source'}
    source = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert '_aiida_zmq_completion' in source
