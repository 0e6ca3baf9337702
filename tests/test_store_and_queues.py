"""Durable store and queue semantics: offline submit, FIFO across the memory window, prefetch, clean shutdown,
permissions, and the `next_task` / iteration interface that `verdi process repair` uses."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq.broker.config import BrokerConfig
from aiida_zmq.broker.server import Broker
from aiida_zmq.exceptions import BrokerRunning, StoreError
from aiida_zmq.store import STORE_FILENAME, TaskStore, submit_offline
from aiida_zmq.testing import BrokerProcess, wait_until


def test_offline_submit_is_delivered_when_the_broker_starts(tmp_path, zmq_broker_factory):
    data_dir = tmp_path / 'broker'
    ids = [submit_offline(data_dir, 'work', b'\x00J"task %d"' % number) for number in range(3)]
    assert ids == sorted(ids)
    assert oct(data_dir.stat().st_mode & 0o777) == '0o700'
    assert oct((data_dir / STORE_FILENAME).stat().st_mode & 0o777) == '0o600'

    broker = zmq_broker_factory(data_dir=data_dir)
    communicator = aiida_zmq.connect(broker.endpoint)
    seen = [task.body for task in communicator.task_queue('work')]
    assert seen == ['task 0', 'task 1', 'task 2']
    communicator.close()


def test_offline_submit_refused_while_a_broker_runs(zmq_broker):
    with pytest.raises(BrokerRunning, match='send tasks through it'):
        submit_offline(zmq_broker.data_dir, 'work', b'x')


def test_fifo_across_the_memory_window_with_tasks_on_disk(tmp_path):
    """A window of 10 tasks in memory, 250 queued: every task comes out once, in order, paged in from disk."""
    config = BrokerConfig(window=10, heartbeat=0.2)
    broker = Broker(tmp_path / 'b', [f'ipc://{tmp_path}/b.sock'], config).start_in_thread()
    try:
        producer = aiida_zmq.connect(f'ipc://{tmp_path}/b.sock')
        queue = producer.task_queue('fifo')
        for number in range(250):
            queue.task_send(number, no_reply=True)
        consumer = aiida_zmq.connect(f'ipc://{tmp_path}/b.sock')
        received: list[int] = []
        done = threading.Event()

        def consume(_communicator, number):
            received.append(number)
            if len(received) == 250:
                done.set()

        consumer.task_queue('fifo', prefetch_count=3).add_task_subscriber(consume)
        assert done.wait(30), f'only {len(received)} of 250 tasks arrived'
        assert received == list(range(250))
        consumer.close()
        producer.close()
    finally:
        broker.stop()


def test_prefetch_limits_what_one_consumer_holds(zmq_broker):
    producer = aiida_zmq.connect(zmq_broker.endpoint)
    holder = aiida_zmq.connect(zmq_broker.endpoint)
    held: list[kiwipy.Future] = []
    holder.task_queue('work', prefetch_count=2).add_task_subscriber(
        lambda _c, _t: held.append(kiwipy.Future()) or held[-1]
    )
    futures = [producer.task_queue('work').task_send(number) for number in range(5)]
    wait_until(lambda: len(held) == 2, timeout=5)
    status = producer.admin('status')
    assert status['queues']['work']['depth'] == 3
    assert [client['held'] for client in status['clients'] if client['prefetch']] == [2]
    for future in held[:1]:
        future.set_result('done')
    wait_until(lambda: len(held) == 3, timeout=5)  # one finished: room for exactly one more
    assert futures[0].result(timeout=5).result(timeout=5) == 'done'  # a nested future, as kiwipy gives
    holder.close()
    producer.close()


def test_tasks_sent_one_at_a_time_alternate_between_consumers(zmq_broker):
    """AiiDA submits one task at a time to daemon workers with room for 200 each: every worker must get its share, not
    the first one all of them (which halved the daemon's throughput with two workers)."""
    producer = aiida_zmq.connect(zmq_broker.endpoint)
    consumers = [aiida_zmq.connect(zmq_broker.endpoint) for _ in range(2)]
    held: list[list[kiwipy.Future]] = [[], []]
    for index, consumer in enumerate(consumers):
        consumer.task_queue('work', prefetch_count=200).add_task_subscriber(
            lambda _c, _t, mine=held[index]: mine.append(kiwipy.Future()) or mine[-1]
        )
    wait_until(lambda: producer.admin('status')['queues'].get('work', {}).get('consumers') == 2, timeout=5)
    for number in range(20):
        producer.task_queue('work').task_send(number, no_reply=True)
        wait_until(lambda n=number: len(held[0]) + len(held[1]) == n + 1, timeout=5)
    assert [len(mine) for mine in held] == [10, 10]
    for mine in held:
        for future in mine:
            future.set_result(None)
    for communicator in (*consumers, producer):
        communicator.close()


def test_sigterm_exits_cleanly_and_keeps_everything(zmq_broker):
    communicator = aiida_zmq.connect(zmq_broker.endpoint)
    for number in range(20):
        communicator.task_queue('work').task_send(number, no_reply=True)
    communicator.close()
    assert zmq_broker.stop() == 0
    # Nothing is left behind but the store: no info file, no lock, no socket.
    assert sorted(path.name for path in zmq_broker.data_dir.iterdir() if not path.name.startswith(STORE_FILENAME)) == []
    assert 'stopping' in zmq_broker.log()
    database = sqlite3.connect(zmq_broker.data_dir / STORE_FILENAME)
    assert database.execute('SELECT count(*) FROM tasks').fetchone() == (20,)
    assert database.execute('PRAGMA integrity_check').fetchone() == ('ok',)
    database.close()


def test_next_task_and_iteration(zmq_broker, zmq_communicator):
    queue = zmq_communicator.task_queue('inspect')
    for number in range(3):
        queue.task_send(number, no_reply=True)
    # Look without taking: a task given back with requeue() comes out again, first.
    with queue.next_task(timeout=5) as task:
        assert task.body == 0
        task.requeue()
    bodies = []
    for task in queue:
        bodies.append(task.body)
        with task.processing() as outcome:
            outcome.set_result(None)
    assert bodies == [0, 1, 2]
    with pytest.raises(kiwipy.exceptions.QueueEmpty), queue.next_task(timeout=0.5):
        pass
    assert zmq_communicator.admin('status')['queues']['inspect']['depth'] == 0


def _serve(data_dir, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, '-m', 'aiida_zmq.cli', 'serve', '--data-dir', str(data_dir), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    return subprocess.CompletedProcess(command, process.returncode, output)


def test_serve_refuses_a_data_dir_open_to_others(tmp_path):
    data_dir = tmp_path / 'open'
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    result = _serve(data_dir)
    assert result.returncode == 2
    assert 'open to other users' in result.stdout and f'chmod 700 {data_dir}' in result.stdout


def test_second_broker_on_the_same_data_dir_is_refused(zmq_broker):
    other = BrokerProcess(zmq_broker.data_dir, endpoint=f'ipc://{zmq_broker.data_dir}/other.sock')
    command = [sys.executable, '-m', 'aiida_zmq.cli', 'serve', '--data-dir', str(other.data_dir)]
    command += ['--bind', other.endpoint, '--lock-timeout', '1']
    # The lock is waited for with a bound; a second broker must not start serving the same store.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2
    assert 'one broker per data directory' in output


def test_store_error_is_a_clear_refusal(tmp_path):
    data_dir = tmp_path / 'corrupt'
    data_dir.mkdir(mode=0o700)
    (data_dir / STORE_FILENAME).write_bytes(b'this is not a database' * 100)
    with pytest.raises(StoreError):
        Broker(data_dir, [f'ipc://{tmp_path}/c.sock']).open()


def test_fsync_option_reaches_the_store(tmp_path, zmq_broker_factory, monkeypatch):
    """By default the store syncs its WAL after a commit that someone waits for: what survives power loss, not only a
    crash; a commit nobody waits for (acks) rides on the next sync; `serve --no-fsync` syncs nothing
    (tests/test_power_cut.py shows what each survives). `--fsync` is accepted and means the default."""
    synced: list[int] = []
    fdatasync = os.fdatasync
    monkeypatch.setattr(os, 'fdatasync', lambda fd: (synced.append(fd), fdatasync(fd))[1])
    with contextlib.closing(TaskStore(tmp_path / 'durable.sqlite')) as store:
        task_id = store.insert('q', b'x', True, None, None)
        assert store.commit() and len(synced) == 1
        store.delete([task_id])
        assert store.commit(sync=False) and len(synced) == 1
    with contextlib.closing(TaskStore(tmp_path / 'fast.sqlite', fsync=False)) as store:
        store.insert('q', b'x', True, None, None)
        assert store.commit() and len(synced) == 1

    fast = zmq_broker_factory('--no-fsync')
    communicator = aiida_zmq.connect(fast.endpoint)
    try:
        assert communicator.admin('status')['settings']['fsync'] is False
    finally:
        communicator.close()
    broker = zmq_broker_factory('--fsync', '--peer-timeout', '7', '--max-deliveries', '3')
    communicator = aiida_zmq.connect(broker.endpoint)
    try:
        settings = communicator.admin('status')['settings']
        assert settings['fsync'] is True and settings['peer_timeout'] == 7.0 and settings['max_deliveries'] == 3
        communicator.add_task_subscriber(lambda _comm, task: task * 2)
        assert communicator.task_send(21).result(timeout=10) == 42
    finally:
        communicator.close()
