"""The offline communicator against a real broker process: stored while it is down, sent through it while it runs.

No AiiDA profile: the communicators are built as the plugin builds them (AiiDA's codec, the launch queue name).
"""

from __future__ import annotations

import concurrent.futures
import typing as t
from collections.abc import Callable, Iterator

import kiwipy
import pytest
from plumpy.process_comms import create_continue_body

import aiida_zmq
from aiida_zmq.aiida.broker import aiida_codec
from aiida_zmq.aiida.offline import BrokerNotRunning, OfflineCommunicator, StoreFallbackCommunicator
from aiida_zmq.exceptions import BrokerRunning
from aiida_zmq.testing import BrokerProcess

QUEUE = 'aiida-0123456789abcdef.process.queue'
TIMEOUT = 10.0


@pytest.fixture
def broker(zmq_broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return zmq_broker_factory('--heartbeat', '0.2', '--peer-timeout', '2')


def _connect(broker: BrokerProcess) -> t.Any:
    encoder, decoder = aiida_codec()
    return aiida_zmq.connect(broker.endpoint, encoder=encoder, decoder=decoder, task_queue=QUEUE, heartbeat=0.2)


@pytest.fixture
def offline(broker: BrokerProcess) -> Iterator[OfflineCommunicator]:
    encoder, decoder = aiida_codec()
    communicator = OfflineCommunicator(
        data_dir=str(broker.data_dir),
        profile_name='test',
        task_queue=QUEUE,
        encoder=encoder,
        decoder=decoder,
        connect=lambda: _connect(broker),
    )
    yield communicator
    communicator.close()


def _receive(broker: BrokerProcess, count: int) -> list[t.Any]:
    """Consume ``count`` tasks of the launch queue with a real communicator and return their bodies."""
    received: list[t.Any] = []
    done: concurrent.futures.Future = concurrent.futures.Future()

    def subscriber(_communicator: t.Any, task: t.Any) -> bool:
        received.append(task)
        if len(received) == count:
            done.set_result(True)
        return True

    consumer = _connect(broker)
    try:
        consumer.add_task_subscriber(subscriber)
        done.result(TIMEOUT)
    finally:
        consumer.close()
    return received


def test_stored_while_down_delivered_when_up(broker: BrokerProcess, offline: OfflineCommunicator) -> None:
    broker.stop()
    tasks = [create_continue_body(pid=pk, nowait=False) for pk in range(3)]
    assert all(offline.task_send(task, no_reply=True) is None for task in tasks)
    # Stored, not lost: ``verdi process repair`` sees them while the broker is down.
    assert [task.body for task in offline.task_queue(QUEUE)] == tasks

    # A task that expects a reply is stored too, but says that its result cannot come back.
    future = offline.task_send(create_continue_body(pid=99), no_reply=False)
    assert future is not None
    with pytest.raises(BrokerNotRunning, match='daemon start'):
        future.result(0)

    broker.start()
    assert _receive(broker, 4) == [*tasks, create_continue_body(pid=99)]


def test_sent_through_a_running_broker(broker: BrokerProcess, offline: OfflineCommunicator) -> None:
    """The broker holds the lock: the task goes through it (no write behind its back into its store)."""
    task = create_continue_body(pid=7, nowait=True)
    assert offline.task_send(task, no_reply=True) is None
    assert _receive(broker, 1) == [task]
    with pytest.raises(BrokerRunning):
        list(offline.task_queue(QUEUE))


def test_iteration_acknowledges_processed_tasks(broker: BrokerProcess, offline: OfflineCommunicator) -> None:
    broker.stop()
    for pk in (1, 2, 3):
        offline.task_send(create_continue_body(pid=pk), no_reply=True)
    for task in offline.task_queue(QUEUE):
        if task.body['args']['pid'] == 2:
            with task.processing() as outcome:
                outcome.set_result(False)
    assert [task.body['args']['pid'] for task in offline.task_queue(QUEUE)] == [1, 3]


def test_rpc_and_broadcasts_stay_in_the_process(broker: BrokerProcess, offline: OfflineCommunicator) -> None:
    """What ``run()`` needs with no broker: its processes' RPCs and broadcasts delivered locally."""
    broker.stop()
    offline.add_rpc_subscriber(lambda _c, msg: {'echo': msg}, identifier='42')
    assert offline.rpc_send('42', {'intent': 'status'}).result(TIMEOUT) == {'echo': {'intent': 'status'}}
    with pytest.raises(BrokerNotRunning, match='daemon start'):
        offline.rpc_send('43', {'intent': 'kill'})

    heard: concurrent.futures.Future = concurrent.futures.Future()
    offline.add_broadcast_subscriber(
        kiwipy.BroadcastFilter(lambda _c, body, sender, subject, _id: heard.set_result((sender, subject)), sender=42)
    )
    offline.broadcast_send(None, sender=41, subject='state_changed.running.finished')
    offline.broadcast_send(None, sender=42, subject='state_changed.running.finished')
    assert heard.result(TIMEOUT) == (42, 'state_changed.running.finished')


def test_connected_session_stores_once_the_broker_is_gone(broker: BrokerProcess) -> None:
    encoder, decoder = aiida_codec()
    session = StoreFallbackCommunicator(
        _connect(broker),
        data_dir=str(broker.data_dir),
        profile_name='test',
        task_queue=QUEUE,
        encoder=encoder,
        decoder=decoder,
    )
    try:
        session.add_rpc_subscriber(lambda _c, msg: msg, identifier='on-the-broker')
        assert session.admin('status')['pid'] == broker.pid
        broker.stop()
        # No broker: neither waits for a confirmation that would never come.
        session.add_rpc_subscriber(lambda _c, msg: msg, identifier='local')
        assert session.task_send(create_continue_body(pid=5), no_reply=True) is None
        session.remove_rpc_subscriber('local')
    finally:
        session.close()
    broker.start()
    assert _receive(broker, 1) == [create_continue_body(pid=5)]
