"""The broker's administrative requests (ADMIN): status, dead letters, and a supervisor reporting a dead process."""

from __future__ import annotations

import os

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq.exceptions import AdminError
from aiida_zmq.testing import wait_until


def test_status_reports_queues_clients_and_store(zmq_broker, zmq_communicator):
    zmq_communicator.task_queue('work').task_send('one', no_reply=True)
    status = zmq_communicator.admin('status')
    assert status['pid'] == zmq_broker.pid
    assert status['queues']['work']['depth'] == 1
    assert any(client['pid'] == os.getpid() for client in status['clients'])
    assert status['store_bytes'] > 0
    assert status['dead_letters'] == 0


def test_unknown_operation_is_a_clear_error(zmq_communicator):
    with pytest.raises(AdminError, match=r'unknown operation; known: .*status'):
        zmq_communicator.admin('explode')


def test_peer_gone_requeues_held_tasks_at_once(zmq_broker):
    producer = aiida_zmq.connect(zmq_broker.endpoint)
    holder = aiida_zmq.connect(zmq_broker.endpoint, name='holder')
    held = []
    holder.task_queue('work').add_task_subscriber(lambda _comm, task: held.append(task) or held_forever())
    producer.task_queue('work').task_send('precious', no_reply=True)
    wait_until(lambda: producer.admin('status')['queues']['work']['depth'] == 0, timeout=5)
    # Both communicators live in this process: the broker hears "this pid is gone" and drops both sessions.
    answer = producer.admin('peer-gone', pid=os.getpid())
    assert answer == {'clients': 2, 'requeued': 1}
    # The producer's communicator notices it has no session, says HELLO again and can still read the queue.
    wait_until(lambda: producer.admin('status')['queues']['work']['depth'] == 1, timeout=10)
    holder.close()
    producer.close()


def held_forever():
    import kiwipy

    return kiwipy.Future()  # never resolves: the task stays held


def test_dead_letters_list_requeue_drop(zmq_broker_factory):
    broker = zmq_broker_factory('--max-deliveries', '1')
    communicator = aiida_zmq.connect(broker.endpoint)
    queue = communicator.task_queue('work')
    queue.task_send('a', no_reply=True)
    queue.task_send('b', no_reply=True)
    refusals = []

    def refuse(_communicator, task):
        refusals.append(task)
        raise kiwipy.TaskRejected('not today')  # a failed delivery: counts towards max_deliveries

    subscriber = queue.add_task_subscriber(refuse)
    wait_until(lambda: len(communicator.admin('dead-letters')['dead_letters']) == 2, timeout=10)
    queue.remove_task_subscriber(subscriber)
    assert sorted(refusals) == ['a', 'b']
    letters = communicator.admin('dead-letters')['dead_letters']
    assert {letter['queue'] for letter in letters} == {'work'}
    assert communicator.admin('dead-letters-requeue', ids=[letters[0]['id']]) == {'requeued': 1}
    with queue.next_task(timeout=5) as task:
        assert task.body == 'a'
        with task.processing() as outcome:
            outcome.set_result('done')
    assert communicator.admin('dead-letters-drop') == {'dropped': 1}
    assert communicator.admin('dead-letters')['dead_letters'] == []
    assert communicator.admin('status')['queues']['work']['depth'] == 0
    communicator.close()
