"""The profile's communicator against a real broker process: offline and online, and the switch both ways.

No AiiDA profile: the communicators are built as the plugin builds them (AiiDA's codec, the launch queue name); the
daemon is what a test says (``daemon_running``), here never running, so that the broker's process alone decides.
"""

from __future__ import annotations

import concurrent.futures
import time
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import kiwipy
import pytest
from plumpy.process_comms import create_continue_body

import aiida_zmq
from aiida_zmq.aiida.broker import aiida_codec
from aiida_zmq.aiida.communicator import Mode, ProfileCommunicator
from aiida_zmq.aiida.offline import BrokerNotRunning
from aiida_zmq.testing import BrokerProcess, wait_until

QUEUE = 'aiida-0123456789abcdef.process.queue'
TIMEOUT = 10.0


@pytest.fixture
def broker(zmq_broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return zmq_broker_factory('--heartbeat', '0.2', '--peer-timeout', '2')


def _connect(broker: BrokerProcess) -> t.Any:
    encoder, decoder = aiida_codec()
    return aiida_zmq.connect(broker.endpoint, encoder=encoder, decoder=decoder, task_queue=QUEUE, heartbeat=0.2)


def _profile_communicator(data_dir: Path, connect: Callable[[], t.Any]) -> ProfileCommunicator:
    encoder, decoder = aiida_codec()
    return ProfileCommunicator(
        data_dir=str(data_dir),
        profile_name='test',
        task_queue=QUEUE,
        encoder=encoder,
        decoder=decoder,
        connect=connect,
        daemon_running=lambda: False,
    )


@pytest.fixture
def offline(broker: BrokerProcess) -> Iterator[ProfileCommunicator]:
    communicator = _profile_communicator(broker.data_dir, lambda: _connect(broker))
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


def test_stored_while_down_delivered_when_up(broker: BrokerProcess, offline: ProfileCommunicator) -> None:
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


def test_sent_through_a_running_broker(broker: BrokerProcess, offline: ProfileCommunicator) -> None:
    """A broker holds the lock: online, the task goes through it (no write behind its back into its store)."""
    task = create_continue_body(pid=7, nowait=True)
    assert offline.task_send(task, no_reply=True) is None
    assert offline.mode() is Mode.ONLINE
    assert [stored.body for stored in offline.task_queue(QUEUE)] == [task]  # through the broker, given back after
    assert _receive(broker, 1) == [task]


def test_iteration_acknowledges_processed_tasks(broker: BrokerProcess, offline: ProfileCommunicator) -> None:
    broker.stop()
    for pk in (1, 2, 3):
        offline.task_send(create_continue_body(pid=pk), no_reply=True)
    for task in offline.task_queue(QUEUE):
        if task.body['args']['pid'] == 2:
            with task.processing() as outcome:
                outcome.set_result(False)
    assert [task.body['args']['pid'] for task in offline.task_queue(QUEUE)] == [1, 3]


def test_rpc_and_broadcasts_stay_in_the_process(broker: BrokerProcess, offline: ProfileCommunicator) -> None:
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


def test_connected_session_works_on_once_the_broker_is_gone(broker: BrokerProcess) -> None:
    """Online first, then the broker stops (``verdi daemon stop``): nothing waits for a broker that will not answer.
    Tasks go into the store, subscribers stay here, and a task queue is read from the store (``verdi process repair``
    in the interpreter that submitted while the daemon ran)."""
    session = _profile_communicator(broker.data_dir, lambda: _connect(broker))
    try:
        session.add_rpc_subscriber(lambda _c, msg: msg, identifier='on-the-broker')
        assert session.mode() is Mode.ONLINE and session.connection is not None
        assert session.connection.admin('status')['pid'] == broker.pid
        broker.stop()
        started = time.monotonic()
        assert session.mode() is Mode.OFFLINE
        session.add_rpc_subscriber(lambda _c, msg: msg, identifier='local')
        assert session.task_send(create_continue_body(pid=5), no_reply=True) is None
        assert [task.body for task in session.task_queue(QUEUE)] == [create_continue_body(pid=5)]
        with pytest.raises(BrokerNotRunning):
            session.rpc_send('someone-else', {'intent': 'kill'})
        session.remove_rpc_subscriber('local')
        assert time.monotonic() - started < 2, 'offline calls must not wait for the broker'
    finally:
        session.close()
    broker.start()
    assert _receive(broker, 1) == [create_continue_body(pid=5)]


def test_a_profile_whose_broker_never_ran(tmp_path: Path) -> None:
    """No data directory yet: nothing stored, nothing to iterate, and looking creates nothing."""
    data_dir = tmp_path / 'never' / 'ran'
    communicator = _profile_communicator(data_dir, lambda: pytest.fail('there is no broker to connect to'))
    try:
        assert communicator.mode() is Mode.OFFLINE
        assert list(communicator.task_queue(QUEUE)) == []
        with pytest.raises(kiwipy.QueueEmpty), communicator.task_queue(QUEUE).next_task():
            pass
        assert not data_dir.exists()
        assert communicator.task_send(create_continue_body(pid=1), no_reply=True) is None  # the first one creates it
        assert [task.body['args']['pid'] for task in communicator.task_queue(QUEUE)] == [1]
    finally:
        communicator.close()


@pytest.mark.parametrize('was_online', [False, True], ids=['never-online', 'online-before'])
def test_subscribers_added_offline_are_live_once_a_broker_runs(broker: BrokerProcess, was_online: bool) -> None:
    """A notebook opened before ``verdi daemon start`` (or kept across a stop and a start): its subscribers, added
    offline, hear the broadcasts and RPCs of others once a broker runs, with no call of its own to notice it."""
    communicator = _profile_communicator(broker.data_dir, lambda: _connect(broker))
    if was_online:
        assert communicator.mode() is Mode.ONLINE
    broker.stop()
    other = None
    try:
        assert communicator.mode() is Mode.OFFLINE
        heard: concurrent.futures.Future = concurrent.futures.Future()
        communicator.add_broadcast_subscriber(
            lambda _c, _body, sender, subject, _id: heard.set_result((sender, subject))
        )
        communicator.add_rpc_subscriber(lambda _c, msg: {'echo': msg}, identifier='notebook-process')
        broker.start()
        other = _connect(broker)

        # The communicator goes online by itself (its watcher sees the broker): the RPC becomes routable.
        def routed() -> kiwipy.Future | None:
            try:
                return other.rpc_send('notebook-process', 'hello')
            except kiwipy.UnroutableError:
                return None

        answer = wait_until(routed, TIMEOUT, interval=0.05, what='the subscriber added offline to be reachable')
        assert answer.result(TIMEOUT) == {'echo': 'hello'}
        other.broadcast_send(None, sender=42, subject='state_changed.running.finished')
        assert heard.result(TIMEOUT) == (42, 'state_changed.running.finished')
    finally:
        if other is not None:
            other.close()
        communicator.close()


def test_offline_rpc_to_someone_else_fails_at_once(tmp_path: Path) -> None:
    """As aiida-core's ``Process.kill`` expects: an ``UnroutableError`` from the call, not a future that hangs."""
    communicator = _profile_communicator(tmp_path / 'stopped', lambda: pytest.fail('no broker runs'))
    try:
        started = time.monotonic()
        with pytest.raises(kiwipy.UnroutableError, match='daemon start'):
            communicator.rpc_send(1234, {'intent': 'kill'})
        assert time.monotonic() - started < 1
    finally:
        communicator.close()


def test_a_task_queue_is_one_object_per_name(tmp_path: Path) -> None:
    """As the connection's ``task_queue``: asking again gives the same queue (it was a new object at every call, each
    reading the communicator's private state), and a prefetch count given once stays with it."""
    communicator = _profile_communicator(tmp_path / 'stopped', lambda: pytest.fail('no broker runs'))
    try:
        queue = communicator.task_queue(QUEUE, prefetch_count=3)
        assert communicator.task_queue(QUEUE) is queue
        assert queue.prefetch_count == 3
    finally:
        communicator.close()
