"""RPC semantics that kiwipy's own cases do not cover: one identifier per broker, and no time cap on an answer."""

from __future__ import annotations

import threading
import time

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq.testing import wait_until

FAST = {'heartbeat': 0.2, 'broker_timeout': 2.0}


def test_rpc_identifier_is_unique_across_clients(zmq_broker):
    """Two AiiDA workers must never both answer for one process: the broker, not each client, owns an identifier."""
    first = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    second = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    try:
        first.add_rpc_subscriber(lambda _comm, msg: f'first {msg}', '42')
        with pytest.raises(kiwipy.DuplicateSubscriberIdentifier, match='another client'):
            second.add_rpc_subscriber(lambda _comm, msg: f'second {msg}', '42')
        assert second.rpc_send('42', 'hello').result(timeout=10) == 'first hello'

        # Once its holder lets go, the identifier is free for another client.
        first.remove_rpc_subscriber('42')

        def register() -> bool:
            try:
                second.add_rpc_subscriber(lambda _comm, msg: f'second {msg}', '42')
            except kiwipy.DuplicateSubscriberIdentifier:
                return False
            return True

        wait_until(register, 10, what='the identifier freed by the first client')
        assert first.rpc_send('42', 'again').result(timeout=10) == 'second again'
    finally:
        first.close()
        second.close()


def test_identifier_of_a_closed_client_is_free(zmq_broker):
    holder = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    holder.add_rpc_subscriber(lambda _comm, msg: msg, 'pk-7')
    holder.close()
    other = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    try:
        assert other.add_rpc_subscriber(lambda _comm, msg: f'new {msg}', 'pk-7') == 'pk-7'
        assert other.rpc_send('pk-7', 'x').result(timeout=10) == 'new x'
    finally:
        other.close()


@pytest.mark.parametrize(
    'delay',
    [
        3.0,  # longer than the caller's request and confirm timeouts (1 s here) and its broker's peer timeout (2 s)
        pytest.param(11.0, marks=pytest.mark.slow, id='past-core.zeromq-cap'),  # past core.zeromq's 10 s cap
    ],
)
def test_rpc_answer_has_no_time_cap(zmq_broker, delay):
    """An answer that takes longer than any timeout on its way still reaches the caller (a slow ``pause`` in AiiDA).

    The caller's request and confirm timeouts are 1 s here, so 3 s shows that none of them caps an RPC; the slow
    variant waits past core.zeromq's 10 s cap as well.
    """
    server = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    client = aiida_zmq.connect(zmq_broker.endpoint, request_timeout=1.0, confirm_timeout=1.0, **FAST)
    timers: list[threading.Timer] = []

    def slow(_comm, msg):
        answer = kiwipy.Future()
        timer = threading.Timer(delay, answer.set_result, args=(f'late {msg}',))
        timers.append(timer)
        timer.start()
        return answer

    try:
        server.add_rpc_subscriber(slow, 'slow')
        started = time.monotonic()
        outer = client.rpc_send('slow', 'answer')
        value = outer.result(timeout=30)
        while isinstance(value, kiwipy.Future):
            value = value.result(timeout=30)
        assert value == 'late answer'
        assert time.monotonic() - started >= delay
    finally:
        for timer in timers:
            timer.cancel()
        server.close()
        client.close()
