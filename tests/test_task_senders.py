"""Task sends from caller threads on sockets of their own (``TASK_SUBMIT``): concurrency, restarts, closing."""

from __future__ import annotations

import concurrent.futures
import gc
import threading

import kiwipy
import pytest

import aiida_zmq
from aiida_zmq.testing import wait_until

FAST = {'heartbeat': 0.2, 'broker_timeout': 2.0}


def test_threads_send_concurrently_and_each_result_finds_its_future(zmq_broker):
    producer = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    consumer = aiida_zmq.connect(zmq_broker.endpoint, task_prefetch_count=50, **FAST)
    consumer.add_task_subscriber(lambda _comm, task: task * 10)
    try:

        def send_many(start: int) -> list[tuple[int, kiwipy.Future]]:
            return [(number, producer.task_send(number)) for number in range(start, start + 200)]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            batches = list(pool.map(send_many, range(0, 1600, 200)))
            senders = len(producer._senders)
        futures = [item for batch in batches for item in batch]
        assert len(futures) == 1600
        for number, future in futures:
            assert future.result(timeout=30) == number * 10
        # A socket per sending thread that sent (a pool thread may have had no turn); the I/O thread sent none.
        assert 1 <= senders <= 8
    finally:
        producer.close()
        consumer.close()


def test_send_waiting_for_a_restarted_broker_is_confirmed_and_delivered(zmq_broker):
    """The broker dies while a task waits for its confirm: the sender sends it again once the communicator is
    welcomed by the new broker, and the task is delivered (at least once)."""
    producer = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    try:
        zmq_broker.freeze()  # SIGSTOP: the task sits unread in the dying broker's socket
        sending = concurrent.futures.ThreadPoolExecutor(1).submit(producer.task_send, 'survivor', True)
        with pytest.raises(concurrent.futures.TimeoutError):
            sending.result(timeout=0.5)  # not confirmed by a stopped broker
        zmq_broker.kill()
        zmq_broker.start()
        assert sending.result(timeout=30) is None  # no_reply: confirmed
        with producer.task_queue(aiida_zmq.communicator.DEFAULT_TASK_QUEUE).next_task(timeout=10) as task:
            assert task.body == 'survivor'
    finally:
        producer.close()


def test_close_releases_a_thread_waiting_for_a_confirm(zmq_broker):
    producer = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    zmq_broker.freeze()
    try:
        sending = concurrent.futures.ThreadPoolExecutor(1).submit(producer.task_send, 'never confirmed')
        with pytest.raises(concurrent.futures.TimeoutError):
            sending.result(timeout=0.3)
        producer.close()
        with pytest.raises(kiwipy.CommunicatorClosed):
            sending.result(timeout=5)
        wait_until(lambda: all(sender.closed for sender in producer._senders), 5, what='the sender closed')
    finally:
        zmq_broker.thaw()
        producer.close()


def test_senders_of_ended_threads_and_of_a_closed_communicator_are_closed(zmq_broker):
    producer = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    try:
        thread = threading.Thread(target=producer.task_send, args=('from a short-lived thread', True))
        thread.start()
        thread.join(10)
        gc.collect()
        assert len(producer._senders) == 0  # it went with its thread (and closed its socket)
        producer.task_send('from the main thread', no_reply=True)
        senders = list(producer._senders)
        assert len(senders) == 1 and not senders[0].closed
    finally:
        producer.close()
    assert senders[0].closed
    with pytest.raises(kiwipy.CommunicatorClosed):
        producer.task_send('after close', no_reply=True)
