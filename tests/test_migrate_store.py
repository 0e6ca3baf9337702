"""``aiida_zmq.migrate.move_queue`` with the store of a stopped broker as a side, and with a destination that fails.

No RabbitMQ needed: the move is broker-agnostic, so an aiida-zmq broker stands in for the other side. What is checked
is the order the migration relies on: a task leaves its source only after the destination confirmed it.
"""

from __future__ import annotations

from collections.abc import Callable

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq import store
from aiida_zmq.aiida.communicator import ProfileCommunicator
from aiida_zmq.codec import default_codec
from aiida_zmq.exceptions import BrokerRunning
from aiida_zmq.migrate import move_queue
from aiida_zmq.testing import wait_until

QUEUE = 'migrate.queue'
BODIES = [{'task': 'continue', 'args': {'pid': number}} for number in range(5)]


def _no_broker() -> aiida_zmq.ZmqCommunicator:
    raise AssertionError('the offline side was asked to connect to a broker')


def _offline(data_dir, connect: Callable[[], aiida_zmq.ZmqCommunicator] = _no_broker) -> ProfileCommunicator:
    codec = default_codec()
    return ProfileCommunicator(
        data_dir=str(data_dir),
        profile_name='test',
        task_queue=QUEUE,
        encoder=codec.encode,
        decoder=codec.decode,
        connect=connect,
        daemon_running=lambda: False,
    )


def _stored(data_dir) -> list:
    task_store = store.TaskStore(data_dir / store.STORE_FILENAME)
    try:
        return [default_codec().decode(task.payload) for task in task_store.load_ready(QUEUE, 0, 100)]
    finally:
        task_store.close()


def _fill_store(data_dir) -> None:
    for body in BODIES:
        store.submit_offline(data_dir, QUEUE, default_codec().encode(body))


def test_from_a_stopped_store_to_a_broker_and_back(tmp_path, zmq_broker) -> None:
    data_dir = tmp_path / 'stopped'
    _fill_store(data_dir)
    source = _offline(data_dir)
    broker = aiida_zmq.connect(zmq_broker.endpoint)
    try:
        assert move_queue(source, broker, QUEUE) == len(BODIES)
        assert _stored(data_dir) == []
        assert broker.admin('status')['queues'][QUEUE]['depth'] == len(BODIES)
        assert move_queue(broker, source, QUEUE) == len(BODIES)  # into the store: each one committed, then acked
        assert _stored(data_dir) == BODIES  # in order, none lost, none twice
        assert broker.admin('status')['queues'][QUEUE]['depth'] == 0
    finally:
        broker.close()
        source.close()


def test_a_store_held_by_a_broker_is_read_through_it(tmp_path, zmq_broker_factory) -> None:
    """With a broker holding the store, the profile's communicator is online: its tasks come through the broker,
    and nothing reads or writes the store behind the broker's back."""
    data_dir = tmp_path / 'running'
    _fill_store(data_dir)
    zmq_broker_factory(data_dir=data_dir)  # holds the store's lock from now on
    source = _offline(data_dir, connect=lambda: aiida_zmq.connect(data_dir=data_dir))
    try:
        with pytest.raises(BrokerRunning):
            store.submit_offline(data_dir, QUEUE, b'behind its back')
        bodies = []
        for task in source.task_queue(QUEUE):
            bodies.append(task.body)
        assert bodies == BODIES
        assert source.connection is not None and source.connection.admin('status')['queues'][QUEUE]['depth'] == 5
    finally:
        source.close()


@pytest.mark.parametrize('stopped_source', [True, False], ids=['store', 'broker'])
def test_a_task_the_destination_did_not_confirm_stays_at_the_source(
    tmp_path, zmq_broker_factory, stopped_source: bool
) -> None:
    gone = zmq_broker_factory()
    destination = aiida_zmq.connect(gone.endpoint, confirm_timeout=1.0)
    gone.stop()  # the destination goes away before it confirms anything
    if stopped_source:
        data_dir = tmp_path / 'stopped'
        _fill_store(data_dir)
        source = _offline(data_dir)
    else:
        running = zmq_broker_factory()
        source = aiida_zmq.connect(running.endpoint)
        for body in BODIES:
            source.task_queue(QUEUE).task_send(body, no_reply=True)
    try:
        with pytest.raises(kiwipy.DeliveryFailed, match='did not confirm'):
            move_queue(source, destination, QUEUE)
        if stopped_source:
            assert _stored(data_dir) == BODIES
        else:
            # kiwipy acknowledges a task whose processing raised: the move must not let it, the task goes back.
            wait_until(
                lambda: source.admin('status')['queues'][QUEUE]['depth'] == len(BODIES),
                timeout=10,
                what='the task to go back to the source queue',
            )
            assert [task.body for task in source.task_queue(QUEUE)] == BODIES
    finally:
        destination.close()
        source.close()
