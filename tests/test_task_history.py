"""Each task's history (issue 23.2): the events of its life, kept in the store with the batch, bounded, shown by
``aiida-zmq tasks show`` with the broker running and stopped."""

from __future__ import annotations

import json
import threading

import kiwipy
from click.testing import CliRunner

import aiida_zmq
from aiida_zmq.cli.main import main
from aiida_zmq.store import DEAD, DELIVERED, READY, TaskStore
from aiida_zmq.store_history import HistoryLimits
from aiida_zmq.testing import wait_until


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _events(rows: list[dict]) -> list[tuple[str, str]]:
    return [(event['event'], event['detail']) for event in rows[0]['events']]


def test_history_of_a_refused_then_answered_task(zmq_broker, zmq_communicator) -> None:
    """Refused by one consumer (NACK), answered by the next: every step is in its history, with who and why."""
    refused = threading.Event()

    def refuse(_communicator, _body):
        refused.set()
        raise kiwipy.TaskRejected('not me')

    refuser = aiida_zmq.connect(zmq_broker.endpoint, name='refuser')
    try:
        refuser.add_task_subscriber(refuse, identifier='refuse')
        future = zmq_communicator.task_send('work', no_reply=False)
        assert refused.wait(10)
        refuser.remove_task_subscriber('refuse')
    finally:
        refuser.close()
    answerer = aiida_zmq.connect(zmq_broker.endpoint, name='answerer')
    try:
        answerer.add_task_subscriber(lambda _c, body: f'done {body}')
        assert future.result(timeout=10) == 'done work'
    finally:
        answerer.close()

    def answered() -> list[dict]:
        rows = json.loads(run('tasks', 'show', '1', '--endpoint', zmq_broker.endpoint, '--json'))
        return rows if rows and rows[0]['events'][-1]['event'] == 'answered' else []

    rows = wait_until(answered, timeout=10, what='the answer to be committed')
    events = _events(rows)
    assert rows[0]['state'] == 'gone'
    assert [name for name, _ in events] == ['stored', 'delivered', 'given back', 'delivered', 'answered'], events
    assert events[1][1].startswith('to refuser (pid ') and 'delivery 1, pushed' in events[1][1], events
    assert events[2][1].startswith('refused by its holder (NACK): offered again in '), events
    assert events[3][1].startswith('to answerer (pid ') and 'delivery 2' in events[3][1], events
    assert events[4][1].startswith('by answerer (pid '), events
    text = run('tasks', 'show', '1', '--endpoint', zmq_broker.endpoint)
    assert text.splitlines()[0] == 'task 1: no longer stored', text
    assert 'given back: refused by its holder (NACK)' in text, text


def test_history_of_a_task_whose_holder_went_silent_survives_the_broker(zmq_broker, zmq_communicator) -> None:
    """A holder that stops answering (its process frozen): the task goes to the next consumer after the peer timeout,
    and its history says so; with the broker stopped the history is read from the store."""
    import os
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys, threading, aiida_zmq\n'
            'c = aiida_zmq.connect(sys.argv[1], name="frozen")\n'
            'got = threading.Event()\n'
            'c.add_task_subscriber(lambda _c, b: (got.set(), threading.Event().wait())[1])\n'
            'got.wait(30); print("holding", flush=True); threading.Event().wait(60)\n',
            zmq_broker.endpoint,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        zmq_communicator.task_send('slow', no_reply=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == 'holding'
        os.kill(holder.pid, signal.SIGSTOP)
        rows = wait_until(
            lambda: [row for row in json.loads(run('tasks', 'list', '--endpoint', zmq_broker.endpoint, '--json'))
                     if row['state'] == 'ready'],
            timeout=30,
            what='the silent holder to lose its task',
        )  # fmt: skip
        assert rows[0]['id'] == 1
    finally:
        holder.kill()
        holder.wait(10)
    zmq_communicator.close()
    zmq_broker.stop()
    rows = json.loads(run('tasks', 'show', '1', '--data-dir', str(zmq_broker.data_dir), '--json'))
    events = _events(rows)
    assert rows[0]['state'] == 'ready' and rows[0]['holder'] is None, rows
    assert [name for name, _ in events] == ['stored', 'delivered', 'given back'], events
    assert events[2][1].startswith('its holder was silent for '), events
    assert events[2][1].endswith(': back in its queue for another consumer'), events


def test_history_is_written_with_the_batch_and_bounded(tmp_path) -> None:
    """Events commit with the task rows they describe (a rolled back batch leaves none), per task at most
    ``per_task`` (the newest kept, after `stored`), and no more than ``max_rows`` in all."""
    store = TaskStore(tmp_path / 'tasks.sqlite3')
    store.history.limits = HistoryLimits(per_task=8, max_rows=50, prune_interval=0, write_interval=0)
    task_id = store.insert('q', b'x', True, None, None)
    store.rollback()
    assert store.history.events([task_id]) == {}
    task_id = store.insert('q', b'x', True, None, None)
    for attempt in range(1, 21):
        store.stage(task_id, DELIVERED, attempt)
        store.history.record(task_id, 'delivered', f'delivery {attempt}')
        store.stage(task_id, READY, attempt)
        store.history.record(task_id, 'given back', f'back {attempt}')
        store.commit()
    events = store.history.events([task_id])[task_id]
    assert events[0]['event'] == 'stored' and events[-1]['detail'] == 'back 20', events
    assert len(events) <= 8 + 1, events
    for _ in range(60):
        store.insert('q', b'y', True, None, None)
    store.commit()
    store.stage(task_id, DEAD, 20, 'why')
    store.history.record(task_id, 'dead-lettered', 'why')
    store.commit()
    assert store.history.row_count() <= 50
    store.close()


def test_no_history_when_switched_off(tmp_path) -> None:
    store = TaskStore(tmp_path / 'tasks.sqlite3', history=False)
    task_id = store.insert('q', b'x', True, None, None)
    store.commit()
    assert store.history.events([task_id]) == {} and store.history.row_count() == 0
    store.close()


def test_serve_takes_the_switch(zmq_broker_factory) -> None:
    broker = zmq_broker_factory('--no-task-history')
    communicator = aiida_zmq.connect(broker.endpoint)
    try:
        communicator.task_send('q', no_reply=True)  # returns once the task is committed
    finally:
        communicator.close()
    rows = json.loads(run('tasks', 'show', '1', '--endpoint', broker.endpoint, '--json'))
    assert [(row['state'], row['events']) for row in rows] == [('ready', [])], rows


def test_history_waits_for_a_batch_that_writes_anyway(tmp_path) -> None:
    """Events are written with the first batch that writes once they are due (no commit of their own), shown while
    they wait, and written at close."""
    store = TaskStore(tmp_path / 'tasks.sqlite3')
    store.history.limits = HistoryLimits(write_interval=3600)
    task_id = store.insert('q', b'x', True, None, None)
    store.commit()
    assert store.history.row_count() == 0  # waiting: not due
    assert [e['event'] for e in store.history.events([task_id])[task_id]] == ['stored']
    store.history.record(task_id, 'delivered', 'to x')
    assert store.commit() is False  # nothing else to write: no transaction for the events alone
    store.history.limits = HistoryLimits(write_interval=0)
    store.stage(task_id, DELIVERED, 1)
    store.commit()
    assert store.history.row_count() == 2
    store.history.limits = HistoryLimits(write_interval=3600)
    store.history.record(task_id, 'given back', 'why')
    store.close()
    store = TaskStore(tmp_path / 'tasks.sqlite3')
    assert [e['event'] for e in store.history.events([task_id])[task_id]] == ['stored', 'delivered', 'given back']
    store.close()
