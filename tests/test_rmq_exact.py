"""The communicator raises what ``RmqThreadCommunicator`` raises, when it raises it, and returns when it returns.

Each test holds one point of the list in ``docs/interfaces.md`` ("RabbitMQ-exact"), against a real broker process.
What kiwipy's, plumpy's and aiida-core's own suites check is run by ``tests/upstream``; these are the points as this
project states them, some of them stricter than any upstream test.
"""

from __future__ import annotations

import concurrent.futures
import gc
import socket as stdlib_socket
import subprocess
import sys
import threading
import time

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq.exceptions import BrokerUnavailable
from aiida_zmq.testing import BrokerProcess

TIMEOUT = 10.0


@pytest.fixture
def pair(zmq_broker: BrokerProcess):
    """Two communicators of one broker, as two processes of AiiDA would be."""
    first, second = aiida_zmq.connect(zmq_broker.endpoint), aiida_zmq.connect(zmq_broker.endpoint)
    yield first, second
    first.close()
    second.close()


def test_rpc_send_to_nobody_raises_from_the_call(pair) -> None:
    """aiida-core's ``Process.kill`` catches ``UnroutableError`` around ``rpc_send`` for children that finished."""
    caller, _ = pair
    started = time.monotonic()
    with pytest.raises(kiwipy.UnroutableError, match='nobody-here'):
        caller.rpc_send('nobody-here', {'intent': 'kill'})
    assert time.monotonic() - started < 1.0


def test_rpc_send_returns_once_routed_so_one_s_own_subscriber_has_it(pair) -> None:
    """A call to one's own subscriber is handled before ``rpc_send`` returns: ``close()`` right after loses nothing
    (kiwipy's ``test_context_manager``)."""
    communicator, _ = pair
    received: list = []
    communicator.add_rpc_subscriber(lambda _c, msg: received.append(msg), 'mine')
    with communicator:
        communicator.rpc_send('mine', 'get this')
    assert received == ['get this']


def test_rpc_send_inside_a_subscriber_fails_its_future(pair) -> None:
    """On the I/O thread ``rpc_send`` cannot wait for its routing: the future fails with ``UnroutableError``."""
    server, client = pair
    inner: concurrent.futures.Future = concurrent.futures.Future()

    def forwarding(communicator, _msg):
        inner.set_result(communicator.rpc_send('nobody-here', None))
        return 'forwarded'

    server.add_rpc_subscriber(forwarding, 'forwarding')
    assert client.rpc_send('forwarding', None).result(TIMEOUT) == 'forwarded'
    with pytest.raises(kiwipy.UnroutableError):
        inner.result(TIMEOUT).result(TIMEOUT)


def test_removed_rpc_subscriber_is_unroutable_when_remove_returns(pair) -> None:
    server, client = pair
    for _ in range(20):
        server.add_rpc_subscriber(lambda _c, msg: msg, 'coming-and-going')
        assert client.rpc_send('coming-and-going', 1).result(TIMEOUT) == 1
        server.remove_rpc_subscriber('coming-and-going')
        with pytest.raises(kiwipy.UnroutableError):
            client.rpc_send('coming-and-going', 2)


def test_broadcast_subscription_in_force_when_add_returns(zmq_broker: BrokerProcess) -> None:
    """Broadcasts sent right after ``add_broadcast_subscriber`` returned all arrive (7 of 20 were missed when the
    subscription went out without an answer)."""
    sender = aiida_zmq.connect(zmq_broker.endpoint)
    try:
        for index in range(20):
            listener = aiida_zmq.connect(zmq_broker.endpoint)
            try:
                heard: concurrent.futures.Future = concurrent.futures.Future()
                listener.add_broadcast_subscriber(lambda _c, body, *_, heard=heard: heard.set_result(body))
                assert sender.broadcast_send(index) is True
                assert heard.result(TIMEOUT) == index
            finally:
                listener.close()
    finally:
        sender.close()


def test_broadcasts_wait_for_a_subscriber(pair) -> None:
    """From its first subscriber on (of any kind), a communicator keeps the broadcasts that arrive while it has no
    broadcast subscriber, for the next one, as RabbitMQ keeps them in the communicator's broadcast queue."""
    listener, sender = pair
    listener.add_rpc_subscriber(lambda _c, msg: msg, 'makes-the-subscription')
    sender.broadcast_send('early', subject='one')
    heard: list = []
    done = threading.Event()

    def subscriber(_c, body, _sender, subject, _correlation_id):
        heard.append((body, subject))
        if len(heard) == 2:
            done.set()

    listener.add_broadcast_subscriber(subscriber)
    sender.broadcast_send('late', subject='two')
    assert done.wait(TIMEOUT)
    assert heard == [('early', 'one'), ('late', 'two')]


BROADCAST_AND_EXIT = """
import os, sys
import aiida_zmq
communicator = aiida_zmq.connect(sys.argv[1])
assert communicator.broadcast_send('last words') is True
os._exit(0)  # no close(), no linger: what was sent before the return must be with the broker already
"""


def test_broadcast_send_returns_once_the_broker_took_it(pair, zmq_broker: BrokerProcess) -> None:
    listener, _ = pair
    heard: concurrent.futures.Future = concurrent.futures.Future()
    listener.add_broadcast_subscriber(lambda _c, body, *_: heard.set_result(body))
    subprocess.run([sys.executable, '-c', BROADCAST_AND_EXIT, zmq_broker.endpoint], check=True, timeout=60)
    assert heard.result(TIMEOUT) == 'last words'


def test_broadcast_send_says_false_when_the_broker_does_not_answer(zmq_broker: BrokerProcess) -> None:
    communicator = aiida_zmq.connect(zmq_broker.endpoint, broker_timeout=1.0)
    try:
        zmq_broker.freeze()
        try:
            started = time.monotonic()
            assert communicator.broadcast_send('into the void') is False
            assert time.monotonic() - started < 5
        finally:
            zmq_broker.thaw()
    finally:
        communicator.close()


def test_task_subscription_in_force_when_add_returns(pair) -> None:
    consumer, observer = pair
    queue = consumer.task_queue('subscribed-queue')
    queue.add_task_subscriber(lambda _c, task: task)
    assert observer.admin('status')['queues']['subscribed-queue']['consumers'] == 1
    queue_subscriber = queue.add_task_subscriber(lambda _c, task: task)
    queue.remove_task_subscriber(queue_subscriber)
    assert observer.admin('status')['queues']['subscribed-queue']['consumers'] == 1  # one subscriber left


def test_a_task_sent_to_oneself_is_taken_before_task_send_returns(zmq_communicator) -> None:
    """plumpy's subscriber schedules the work on the sender's loop, then adds a done callback from the
    communicator's thread: the loop must not run ahead of it (asyncio's debug mode rejects the callback then)."""
    taken: list = []
    zmq_communicator.add_task_subscriber(lambda _c, task: taken.append(task))
    for index in range(50):
        zmq_communicator.task_send(index, no_reply=True)
        assert taken[-1:] == [index]


def test_prefetch_is_unlimited_by_default(zmq_communicator) -> None:
    """kiwipy's default prefetch count, 0, means no limit: every task is handed out while others are processed."""
    pending: list[kiwipy.Future] = []
    all_in = threading.Event()

    def subscriber(_c, task):
        future = kiwipy.Future()
        pending.append(future)
        if len(pending) == 5:
            all_in.set()
        return future

    zmq_communicator.add_task_subscriber(subscriber)
    results = [zmq_communicator.task_send(index) for index in range(5)]
    assert all_in.wait(TIMEOUT)
    for index, future in enumerate(pending):
        future.set_result(index * 10)
    # A subscriber's future makes the sender's result a future too (kiwipy's nested futures).
    assert [result.result(TIMEOUT).result(TIMEOUT) for result in results] == [0, 10, 20, 30, 40]


def test_a_forgotten_outcome_puts_the_task_back(zmq_communicator) -> None:
    """kiwipy's ``test_queue_task_forget``: a ``process()`` future garbage-collected without an outcome."""
    queue = zmq_communicator.task_queue('forgetful')
    result = queue.task_send(1)
    with queue.next_task() as task:
        outcome = task.process()
    with pytest.raises(kiwipy.QueueEmpty), queue.next_task():
        pass
    del outcome, task
    gc.collect()
    with queue.next_task(timeout=TIMEOUT) as task:
        task.process().set_result(10)
    assert result.result(TIMEOUT) == 10


@pytest.mark.parametrize(
    ('call', 'error'),
    [
        (lambda c: c.add_rpc_subscriber(lambda *_: None, '\ud800'), ValueError),
        (lambda c: c.rpc_send('\udfff', None), ValueError),
        (lambda c: c.add_rpc_subscriber(lambda *_: None, 'x' * 300), ValueError),
        (lambda c: c.task_queue(7), TypeError),
        (lambda c: c.task_queue(None), TypeError),
        (lambda c: c.task_queue(b'bytes'), TypeError),
        (lambda c: c.task_queue(''), ValueError),
        (lambda c: c.task_queue('\ud800').task_send('x'), ValueError),
    ],
    ids=['surrogate-rpc-id', 'surrogate-recipient', 'long-rpc-id', 'int-queue', 'none-queue', 'bytes-queue',
         'empty-queue', 'surrogate-queue'],
)  # fmt: skip
def test_bad_names_fail_in_the_caller_and_the_communicator_goes_on(zmq_communicator, call, error) -> None:
    """Nothing a caller passes reaches the I/O thread unchecked: it used to die there, and every caller hung."""
    with pytest.raises(error):
        call(zmq_communicator)
    zmq_communicator.add_rpc_subscriber(lambda _c, msg: msg * 2, f'echo-{error.__name__}')
    assert zmq_communicator.rpc_send(f'echo-{error.__name__}', 21).result(TIMEOUT) == 42
    assert zmq_communicator._io_thread.is_alive()


def _free_tcp_port() -> int:
    with stdlib_socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_connect_fails_at_once_when_the_answer_is_known(tmp_path) -> None:
    """A missing socket file, a stale one, a refused TCP port: known in milliseconds, not after connect_timeout."""
    stale = tmp_path / 'stale.sock'
    listener = stdlib_socket.socket(stdlib_socket.AF_UNIX)
    listener.bind(str(stale))
    listener.close()  # the file stays, nobody listens: what a broker killed with -9 leaves
    cases = {
        f'ipc://{tmp_path}/missing.sock': 'no broker socket at',
        f'ipc://{tmp_path}/no/such/dir/broker.sock': 'directory does not exist',
        f'ipc://{stale}': 'connection refused',
        f'tcp://127.0.0.1:{_free_tcp_port()}': 'connection refused',
    }
    for endpoint, message in cases.items():
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=message):
            aiida_zmq.connect(endpoint, connect_timeout=10)
        assert time.monotonic() - started < 2, endpoint
