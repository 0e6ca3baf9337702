"""Reliability of the broker process: crashes, dead and stopped clients, restarts, dead letters, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import kiwipy
import pytest
import zmq

import aiida_zmq
from aiida_zmq import protocol
from aiida_zmq.exceptions import MessageTooLarge
from aiida_zmq.store import STORE_FILENAME, TaskStore
from aiida_zmq.testing import wait_until

FAST = {'heartbeat': 0.2, 'broker_timeout': 2.0}
ROOT = Path(__file__).resolve().parent.parent


def unwrap(future, timeout: float = 10.0):
    value = future.result(timeout=timeout)
    while isinstance(value, kiwipy.Future):
        value = value.result(timeout=timeout)
    return value


def collector(expected: int):
    """A task subscriber that records bodies and resolves ``done`` once ``expected`` distinct ones arrived."""
    seen: set = set()
    lock = threading.Lock()
    done = kiwipy.Future()

    def subscriber(_comm, task):
        with lock:
            seen.add(task)
            if len(seen) >= expected and not done.done():
                done.set_result(True)
        return task

    return subscriber, seen, done


class Actor:
    """A client in its own process (tests/actors.py), read line by line."""

    def __init__(self, mode: str, endpoint: str, queue: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'tests.actors', mode, endpoint, queue],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30):
            self.kill()
            raise TimeoutError(f'actor {mode} did not become ready')

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())
            if line.strip() == 'ready':
                self._ready.set()

    def got(self) -> int:
        return sum(1 for line in self.lines if line.startswith('got '))

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.send_signal(signum)
            self.process.wait(15)


def test_kill9_mid_stream_loses_no_confirmed_task(zmq_broker):
    """kill -9 the broker while a producer sends: every task whose send returned is delivered after the restart."""
    queue = f'q-{uuid.uuid4().hex}'
    producer = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, **FAST)
    confirmed: list[int] = []
    failed: list[BaseException] = []
    total = 600

    def produce():
        for index in range(total):
            try:
                producer.task_send(index, no_reply=True)
                confirmed.append(index)
            except Exception as exception:  # a send may fail loudly, never silently
                failed.append(exception)

    thread = threading.Thread(target=produce)
    thread.start()
    wait_until(lambda: len(confirmed) >= 150, 30, what='150 confirmed sends')
    zmq_broker.kill()
    zmq_broker.start()
    thread.join(120)
    assert not thread.is_alive()
    assert len(confirmed) + len(failed) == total
    assert len(confirmed) >= total - 5  # sends wait through the restart instead of failing

    subscriber, seen, done = collector(len(confirmed))
    consumer = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, task_prefetch_count=50, **FAST)
    consumer.add_task_subscriber(subscriber)
    done.result(timeout=60)
    assert set(confirmed) <= seen
    producer.close()
    consumer.close()


def test_dead_consumer_tasks_go_to_another(zmq_broker):
    queue = f'q-{uuid.uuid4().hex}'
    holder = Actor('hold', zmq_broker.endpoint, queue)
    producer = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, **FAST)
    futures = [producer.task_send(index) for index in range(20)]
    wait_until(lambda: holder.got() == 20, 15, what='the holder to get all tasks')
    holder.kill()

    subscriber, seen, done = collector(20)
    consumer = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, task_prefetch_count=50, **FAST)
    consumer.add_task_subscriber(subscriber)
    done.result(timeout=30)  # after the broker's peer timeout (2 s here)
    assert seen == set(range(20))
    # The holder had answered 'pending' (its subscriber returned a future): the sender's futures resolved to futures,
    # which the second consumer's answers now resolve.
    assert [unwrap(future) for future in futures] == list(range(20))
    producer.close()
    consumer.close()


def test_stopped_client_does_not_slow_others(zmq_broker_factory):
    """A SIGSTOPped subscriber of broadcasts and tasks: the others' RPCs and tasks go on at full speed."""
    # The frozen client must outlive the 300 rounds below (2.3 s here under load, from its HELLO): a peer timeout of
    # 2 s declared it dead before they ended, and its RPC identifier was gone before the call that checks it.
    zmq_broker = zmq_broker_factory('--heartbeat', '0.2', '--peer-timeout', '8')
    queue = f'q-{uuid.uuid4().hex}'
    frozen = Actor('listen', zmq_broker.endpoint, 'frozen-rpc')
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        server = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, **FAST)
        client = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, **FAST)
        server.add_rpc_subscriber(lambda _comm, msg: msg, 'echo')
        server.add_task_subscriber(lambda _comm, task: task)
        payload = 'x' * 4096
        started = time.monotonic()
        for index in range(300):
            client.broadcast_send(payload)  # every broadcast also targets the frozen client
            assert client.rpc_send('echo', index).result(timeout=5) == index
            assert client.task_send(index).result(timeout=5) == index
        assert time.monotonic() - started < 30
        # The frozen client's RPC identifier is still registered, but calls to it do not block the broker.
        pending = client.rpc_send('frozen-rpc', 'hello')
        assert client.rpc_send('echo', 'still here').result(timeout=5) == 'still here'
        # Once it is declared dead, the pending call fails instead of hanging forever.
        with pytest.raises(kiwipy.UnroutableError):
            pending.result(timeout=15)
        server.close()
        client.close()
    finally:
        frozen.kill()


@pytest.mark.parametrize('how', ['restart', 'kill'])
def test_restart_reconnects_and_reregisters(zmq_broker, how):
    queue = f'q-{uuid.uuid4().hex}'
    service = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, **FAST)
    service.add_rpc_subscriber(lambda _comm, msg: f'echo {msg}', 'service')
    service.add_task_subscriber(lambda _comm, task: task * 2)
    broadcasts = []
    got_broadcast = threading.Event()

    def on_broadcast(_comm, body, sender, subject, correlation_id):
        broadcasts.append(body)
        got_broadcast.set()

    service.add_broadcast_subscriber(on_broadcast)

    if how == 'kill':
        zmq_broker.kill()
        zmq_broker.start()
    else:
        zmq_broker.restart()

    client = aiida_zmq.connect(zmq_broker.endpoint, task_queue=queue, **FAST)

    def rpc_works():
        try:
            return client.rpc_send('service', 1).result(timeout=2) == 'echo 1'
        except kiwipy.UnroutableError:
            return False  # the service has not re-registered yet

    wait_until(rpc_works, 20, interval=0.1, what='the service to re-register its RPC identifier')
    assert client.task_send(21).result(timeout=20) == 42
    client.broadcast_send('after restart')
    assert got_broadcast.wait(10)
    assert broadcasts == ['after restart']
    service.close()
    client.close()


def test_dead_letter_after_redelivery_cap(zmq_broker_factory):
    broker = zmq_broker_factory('--max-deliveries', '3', '--heartbeat', '0.2', '--peer-timeout', '2')
    queue = f'q-{uuid.uuid4().hex}'
    deliveries = []

    def refuse(_comm, task):
        deliveries.append(time.monotonic())
        raise kiwipy.TaskRejected('not for me')

    consumer = aiida_zmq.connect(broker.endpoint, task_queue=queue, **FAST)
    consumer.add_task_subscriber(refuse)
    producer = aiida_zmq.connect(broker.endpoint, task_queue=queue, **FAST)
    producer.task_send('poison', no_reply=True)

    store = TaskStore(broker.data_dir / STORE_FILENAME)
    dead = wait_until(lambda: store.dead_letters(queue), 15, what='the task to be dead-lettered')
    assert len(dead) == 1 and dead[0][2] == 3
    assert len(deliveries) == 3  # no hot loop: refused tasks back off, then stop
    assert deliveries[2] - deliveries[1] >= 0.15  # the backoff doubles (0.1 s, then 0.2 s)
    store.close()
    consumer.close()
    producer.close()


def test_malformed_frames_are_dropped_and_logged(zmq_broker, zmq_communicator):
    context = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.connect(zmq_broker.endpoint)
    raw.send_multipart([b'garbage'])
    raw.send_multipart([b'HTTP/1.1', b'GET /'])
    raw.send_multipart([protocol.SIGNATURE, b'\xff'])
    raw.send_multipart([protocol.SIGNATURE, bytes([protocol.Command.TASK_SEND]), b'too few'])
    raw.send_multipart([b'AZMQ/9', bytes([protocol.Command.HELLO]), b'n', b'1000', b''])
    # The TASK_SEND cut short is a request: it is answered first, malformed, by its correlation (issue 14).
    assert raw.poll(5000), 'no answer to the request cut short'
    answer = protocol.decode(raw.recv_multipart())
    assert answer.command is protocol.Command.ERROR and answer.args[:2] == [b'too few', protocol.ErrorCode.MALFORMED]
    assert raw.poll(5000), 'no answer to the wrong protocol version'
    answer = protocol.decode(raw.recv_multipart())
    assert answer.command is protocol.Command.ERROR
    assert answer.args[1] == protocol.ErrorCode.VERSION
    raw.close(0)
    # The broker is still up and serving.
    zmq_communicator.add_rpc_subscriber(lambda _comm, msg: msg, 'ok')
    assert zmq_communicator.rpc_send('ok', 'fine').result(timeout=5) == 'fine'
    log = zmq_broker.log()
    assert 'at least 2 frames' in log and 'not an aiida-zmq message' in log
    assert 'unknown command 0xff' in log and 'TASK_SEND takes' in log


def test_oversized_message_refused_clearly(zmq_broker_factory):
    broker = zmq_broker_factory('--max-message-bytes', '10000')
    communicator = aiida_zmq.connect(broker.endpoint)
    with pytest.raises(MessageTooLarge, match='exceeds the broker maximum'):
        communicator.task_send('x' * 20000)
    assert communicator.task_send('small', no_reply=True) is None
    communicator.close()


def test_wrong_endpoint_and_down_broker_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match='unsupported endpoint'):
        aiida_zmq.connect('http://localhost:1234')
    with pytest.raises(ConnectionError, match=r'no broker socket at .*nobody\.sock'):
        aiida_zmq.connect(f'ipc://{tmp_path}/nobody.sock', connect_timeout=0.5)
    with pytest.raises(ConnectionError, match='aiida-zmq serve --data-dir'):
        aiida_zmq.connect(data_dir=tmp_path)


def test_subscribers_on_the_io_thread_cannot_deadlock_it(zmq_broker):
    """RPC and broadcast subscribers run on the I/O thread (as kiwipy's do on its loop): a blocking call from one of
    them fails with a clear error, the communicator keeps working, and closing it from a subscriber is fine."""
    server = aiida_zmq.connect(zmq_broker.endpoint)
    client = aiida_zmq.connect(zmq_broker.endpoint)

    def blocking(communicator, _message):
        return communicator.task_queue('q').task_send('from inside', no_reply=True)

    server.add_rpc_subscriber(blocking, 'blocking')
    with pytest.raises(kiwipy.RemoteException, match='inside an RPC or broadcast subscriber'):
        client.rpc_send('blocking', None).result(timeout=5)

    def closing(communicator, _message):
        communicator.close()
        return 'closed'

    server.add_rpc_subscriber(closing, 'closing')
    assert client.rpc_send('closing', None).result(timeout=5) == 'closed'
    wait_until(lambda: server.is_closed() and not server._io_thread.is_alive(), timeout=10)
    # The server said goodbye: its identifiers are free again for others.
    client.add_rpc_subscriber(lambda _c, m: m, 'closing')
    client.close()


def test_late_answer_after_takeover_is_refused_and_counted(zmq_broker):
    """A consumer declared dead loses its delivery; its answer arriving later is refused, counted and logged, and
    the consumer that took the task over finishes it."""
    Command = protocol.Command
    queue = f'late-{uuid.uuid4().hex[:8]}'
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(zmq_broker.endpoint)
    producer = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    taker = None
    try:

        def receive(command: protocol.Command) -> protocol.Message:
            while True:
                assert raw.poll(10_000), f'no {command.name} from the broker'
                message = protocol.decode(raw.recv_multipart())
                if message.command is command:
                    return message

        def hello() -> None:
            pid = str(os.getpid()).encode()
            raw.send_multipart(protocol.encode(Command.HELLO, b'slow consumer', b'200', b'', pid, b''))
            receive(Command.WELCOME)

        hello()
        raw.send_multipart(protocol.encode(Command.CONSUME, b'1', queue.encode(), b'1'))
        receive(Command.DONE)
        producer.task_queue(queue).task_send('job', no_reply=True)
        delivered = receive(Command.TASK_DELIVER)
        task_id, attempt = delivered.args[1], delivered.args[2]

        # The raw consumer now goes silent (no heartbeats): after the peer timeout (2 s) the task goes to `taker`.
        subscriber, seen, done = collector(1)
        taker = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
        taker.task_queue(queue).add_task_subscriber(subscriber)
        assert done.result(timeout=15) and seen == {'job'}
        # The taker acknowledges from its I/O thread after the subscriber returns: wait for it, so that the late
        # answers below cannot overtake it.
        wait_until(lambda: producer.admin('status')['stats'].get('tasks_acked') == 1, 10, what="the taker's ack")

        # Its late answer, first without a session, then after a new HELLO: both refused, neither acknowledges.
        raw.send_multipart(protocol.encode(Command.TASK_ACK, task_id, attempt))
        wait_until(
            lambda: producer.admin('status')['stats'].get('sessionless_answers_refused') == 1, 10, what='first refusal'
        )
        hello()
        raw.send_multipart(protocol.encode(Command.TASK_ACK, task_id, attempt))
        stats = wait_until(
            lambda: (s := producer.admin('status')['stats']).get('late_acks_refused') == 1 and s, 10, what='refusals'
        )
        assert stats['tasks_acked'] == 1  # still the taker's answer only
        log = zmq_broker.log()
        assert 'from a client without a session' in log and 'it does not hold that delivery' in log
    finally:
        raw.close(0)
        producer.close()
        if taker is not None:
            taker.close()
