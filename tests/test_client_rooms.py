"""The client's inner interface (issue 19.2): the table of pending requests, and a registry a connection takes.

The table is a unit (no broker); the registry is taken by a real communicator of a real broker process, as a
profile's communicator hands its registry to its connection when it goes online.
"""

from __future__ import annotations

import concurrent.futures
import threading

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq.pending import Pending
from aiida_zmq.protocol import Command
from aiida_zmq.subscribers import Subscribers

FAST = {'heartbeat': 0.2, 'broker_timeout': 2.0}
TIMEOUT = 10.0


def test_pending_fails_what_waits_for_a_correlation_and_at_the_end_everything() -> None:
    pending = Pending()
    routed, result, other, admin = (concurrent.futures.Future() for _ in range(4))
    pending.add(b'1', Command.DONE, routed)  # an RPC through the session waits for two answers
    pending.add(b'1', Command.RPC_RESULT, result)
    pending.add(b'2', Command.RPC_RESULT, other)
    pending.add(b'3', Command.ADMIN_REPLY, admin)
    assert len(pending) == 4

    pending.fail(b'1', kiwipy.UnroutableError('nobody'))
    assert isinstance(routed.exception(0), kiwipy.UnroutableError)
    assert isinstance(result.exception(0), kiwipy.UnroutableError)
    assert not other.done() and len(pending) == 2

    pending.fail_all(lambda correlation: kiwipy.DeliveryFailed(f'restarted ({correlation!r})'), Command.RPC_RESULT)
    assert "b'2'" in str(other.exception(0)) and not admin.done()
    assert pending.pop(b'3', Command.DONE) is None  # another answer: not this one

    admin.cancel()  # its caller gave up: failing it later is harmless
    pending.fail_all(kiwipy.CommunicatorClosed('closed'))
    assert len(pending) == 0 and admin.cancelled()


def test_pending_is_shared_by_threads() -> None:
    """Callers add while the I/O thread resolves: nothing is lost or resolved twice."""
    pending = Pending()
    futures = {str(number).encode(): concurrent.futures.Future() for number in range(4000)}
    keys = list(futures)

    def add(part: list[bytes]) -> None:
        for key in part:
            pending.add(key, Command.TASK_RESULT, futures[key])

    threads = [threading.Thread(target=add, args=(keys[start::4],)) for start in range(4)]
    for thread in threads:
        thread.start()
    resolved = 0
    while resolved < len(keys):
        for key in keys:
            future = pending.pop(key, Command.TASK_RESULT)
            if future is not None:
                future.set_result(key)
                resolved += 1
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(future.result(0) == key for key, future in futures.items()) and len(pending) == 0


class _Owner(kiwipy.Communicator):
    """Stands for a profile's communicator: what the subscribers of its registry are called with."""


def test_a_connection_takes_a_registry_and_the_broker_learns_what_it_holds(zmq_broker) -> None:
    owner = _Owner()
    registry = Subscribers(owner)
    called_with: list[object] = []
    heard: concurrent.futures.Future = concurrent.futures.Future()
    task_done: concurrent.futures.Future = concurrent.futures.Future()

    def rpc(communicator: object, msg: object) -> object:
        called_with.append(communicator)
        return {'echo': msg}

    registry.add_rpc('offline-added', rpc)
    registry.add_broadcast('listener', lambda communicator, body, *_: heard.set_result((communicator, body)))
    registry.add_task('rooms', 'worker', lambda communicator, task: task_done.set_result((communicator, task)))

    connection = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    other = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    try:
        connection.adopt(registry)
        assert other.rpc_send('offline-added', 'hi').result(TIMEOUT) == {'echo': 'hi'}
        assert called_with == [owner]
        assert other.broadcast_send('news')
        assert heard.result(TIMEOUT) == (owner, 'news')
        other.task_queue('rooms').task_send('work', no_reply=True)
        assert task_done.result(TIMEOUT) == (owner, 'work')

        # The one registry: removed through the connection, it is gone from the owner's registry too.
        connection.remove_rpc_subscriber('offline-added')
        assert registry.rpc('offline-added') is None
        with pytest.raises(kiwipy.UnroutableError):
            other.rpc_send('offline-added', 'again')
    finally:
        other.close()
        connection.close()


def test_a_connection_with_subscribers_of_its_own_takes_no_other_registry(zmq_communicator) -> None:
    zmq_communicator.add_broadcast_subscriber(lambda *_: None)
    with pytest.raises(ValueError, match='subscribers of its own'):
        zmq_communicator.adopt(Subscribers(_Owner()))
