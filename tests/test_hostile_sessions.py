"""A session belongs to the client the broker welcomed (issue 21 item 2, issue 20 item 3).

A second red team, as a client that can reach the socket and reads the broker's log (routing ids are there at INFO),
answered another client's `task_send` and `rpc_send` with its own results by naming the victim's session in
`TASK_SUBMIT` / `RPC_SUBMIT`, took every delivery and RPC of a client by connecting with its routing id (ZeroMQ's
`ROUTER_HANDOVER`), claimed a restarted broker's held tasks with a `HELLO` of its own, and deleted confirmed tasks
with a `TASK_ACK` from a socket without a session. Each test here is that attack, through the wire protocol, against
a real `aiida-zmq serve`; each failed on 917f59f.
"""

from __future__ import annotations

import contextlib
import time

import pytest
from kiwipy.rmq.utils import result_response

import aiida_zmq
from aiida_zmq import protocol
from aiida_zmq.codec import default_codec
from aiida_zmq.protocol import Command, ErrorCode
from aiida_zmq.testing import wait_until

from .hostile_peers import Peer, argument, routing_ids_in_log, status

FAST = {'heartbeat': 0.2, 'broker_timeout': 3.0}
CODEC = default_codec()
GUESSES = [b'%d' % n for n in range(1, 40)]  # a communicator's correlations count from 1


@pytest.fixture
def victim(zmq_broker):
    communicator = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    yield communicator
    with contextlib.suppress(Exception):
        communicator.close()


def victim_routing_id(zmq_broker, name_hint: int = 0) -> bytes:
    """The victim's routing id, as the attacker reads it in the broker's log."""
    ids = wait_until(lambda: routing_ids_in_log(zmq_broker.log()), 5, what='a client in the broker log')
    return ids[name_hint]


def test_a_task_submit_naming_another_session_does_not_answer_its_task_send(zmq_broker, victim):
    """Before: the victim's pending task_send resolved to the attacker's 'FORGED-TASK'."""
    pending = victim.task_send('real work for a worker that is not there yet')
    session = victim_routing_id(zmq_broker)
    with Peer(zmq_broker.endpoint) as attacker:
        attacker.hello(b'attacker')
        attacker.send(Command.CONSUME, correlation=b'k', queue=b'evil', prefetch=b'0')
        attacker.expect(Command.DONE, correlation=b'k')
        for guess in GUESSES:
            attacker.send(
                Command.TASK_SUBMIT, correlation=guess, session=session, queue=b'evil', no_reply=b'0', payload=b'x'
            )
        answers = []
        for _ in range(2):  # the confirms, then what reached the attacker's consumer, answered with a forged result
            for reply in attacker.drain():
                if reply.command is Command.TASK_DELIVER:
                    task_id, attempt = argument(reply, 'task_id'), argument(reply, 'attempt')
                    forged = CODEC.encode(result_response('FORGED-TASK'))
                    attacker.send(Command.TASK_REPLY, task_id=task_id, attempt=attempt, final=b'1', payload=forged)
                else:
                    answers.append(reply)
        attacker.admin('status')  # a round trip: the broker has handled every reply
        time.sleep(0.3)  # the victim's I/O thread would resolve a forged result at once; there is no event to await
        assert not pending.done(), pending.result()
        assert {answer.command for answer in answers} == {Command.ERROR}
        assert {argument(answer, 'code') for answer in answers} == {ErrorCode.UNKNOWN_CLIENT}


def test_an_rpc_submit_naming_another_session_does_not_answer_its_rpc_send(zmq_broker, victim):
    """Before: the victim's pending rpc_send resolved to the attacker's 'FORGED-RPC'."""
    with Peer(zmq_broker.endpoint) as server:  # an RPC server that never answers
        server.hello(b'slow-server')
        server.send(Command.RPC_REGISTER, correlation=b'r', identifier=b'slow-server')
        server.expect(Command.RPC_REGISTERED, correlation=b'r')
        pending = victim.rpc_send('slow-server', 'real call')
        server.expect(Command.RPC_REQUEST)
        session = victim_routing_id(zmq_broker)
        with Peer(zmq_broker.endpoint) as attacker:
            attacker.hello(b'attacker')
            attacker.send(Command.RPC_REGISTER, correlation=b'r', identifier=b'evil-rpc')
            attacker.expect(Command.RPC_REGISTERED, correlation=b'r')
            for guess in GUESSES:
                attacker.send(
                    Command.RPC_SUBMIT, correlation=guess, session=session, identifier=b'evil-rpc', payload=b'x'
                )
            answers = []
            for _ in range(2):
                for reply in attacker.drain():
                    if reply.command is Command.RPC_REQUEST:
                        forged = CODEC.encode(result_response('FORGED-RPC'))
                        attacker.send(Command.RPC_REPLY, call_id=argument(reply, 'call_id'), final=b'1', payload=forged)
                    else:
                        answers.append(reply)
            attacker.admin('status')
            time.sleep(0.3)
            assert not pending.done(), pending.result()
            assert {answer.command for answer in answers} == {Command.ERROR}
            assert {argument(answer, 'code') for answer in answers} == {ErrorCode.UNKNOWN_CLIENT}


def test_a_routing_id_cannot_be_taken_over(zmq_broker, victim):
    """Before: a socket connecting with the victim's routing id (ROUTER_HANDOVER) took 20 of 20 of its deliveries."""
    got: list[object] = []
    victim.add_task_subscriber(lambda _comm, task: got.append(task) or 'done')
    session = victim_routing_id(zmq_broker)
    producer = aiida_zmq.connect(zmq_broker.endpoint, **FAST)
    try:
        with Peer(zmq_broker.endpoint, routing_id=session) as thief:
            thief.send(Command.HEARTBEAT)  # a sign of life from the victim's routing id
            time.sleep(0.3)  # the connection (refused or not) is made in ZeroMQ's I/O threads: no event to await
            results = [producer.task_send(n) for n in range(20)]
            stolen = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and len(got) + stolen < 20:
                delivery = thief.socket.poll(100) and protocol.decode(thief.socket.recv_multipart())
                stolen += bool(delivery) and delivery.command is Command.TASK_DELIVER
            assert stolen == 0
            assert [result.result(timeout=10) for result in results] == ['done'] * 20
            assert sorted(got) == list(range(20))
    finally:
        producer.close()


def _welcome_secret(reply) -> bytes:
    assert reply.command is Command.WELCOME, reply
    return argument(reply, 'secret')


def test_held_tasks_are_reclaimed_after_a_restart_only_by_their_holder(zmq_broker):
    """Before: after a restart, another socket whose HELLO listed ids 1..8 got them (8 of 8 would run twice)."""
    with Peer(zmq_broker.endpoint) as producer:
        producer.hello(b'producer')
        for n in range(8):
            producer.send(Command.TASK_SEND, correlation=b'%d' % n, queue=b'q', no_reply=b'1', payload=b'%d' % n)
            producer.expect(Command.TASK_CONFIRM, correlation=b'%d' % n)
    holder = Peer(zmq_broker.endpoint)
    secret = _welcome_secret(holder.hello(b'holder'))
    holder.send(Command.CONSUME, correlation=b'k', queue=b'q', prefetch=b'8')
    held = [holder.expect(Command.TASK_DELIVER) for _ in range(8)]
    claims = b','.join(argument(d, 'task_id') + b':' + argument(d, 'attempt') for d in held)
    holder.close()
    zmq_broker.kill()
    zmq_broker.start()
    with Peer(zmq_broker.endpoint) as thief:
        thief.hello(b'thief', reclaim=claims)
        mine = [client for client in thief.admin('status')['clients'] if client['name'] == 'thief']
        assert mine[0]['held'] == 0
        # The holder, back with the secret it was welcomed with, gets them.
        with Peer(zmq_broker.endpoint) as back:
            assert back.hello(b'holder', reclaim=claims, secret=secret).command is Command.WELCOME
            clients = {client['name']: client for client in back.admin('status')['clients']}
            assert clients['holder']['held'] == 8 and clients['thief']['held'] == 0


def test_an_ack_without_the_holders_session_deletes_nothing(zmq_broker):
    """Before: a TASK_ACK for ids 1..8 from a socket without a session deleted 8 confirmed tasks unrun."""
    with Peer(zmq_broker.endpoint) as producer:
        producer.hello(b'producer')
        for n in range(8):
            producer.send(Command.TASK_SEND, correlation=b'%d' % n, queue=b'q', no_reply=b'1', payload=b'%d' % n)
            producer.expect(Command.TASK_CONFIRM, correlation=b'%d' % n)
    holder = Peer(zmq_broker.endpoint)
    holder.hello(b'holder')
    holder.send(Command.CONSUME, correlation=b'k', queue=b'q', prefetch=b'8')
    held = [holder.expect(Command.TASK_DELIVER) for _ in range(8)]
    holder.close()
    zmq_broker.kill()
    zmq_broker.start()
    with Peer(zmq_broker.endpoint) as stranger:  # no HELLO: no session
        for delivery in held:
            stranger.send(
                Command.TASK_ACK, task_id=argument(delivery, 'task_id'), attempt=argument(delivery, 'attempt')
            )
        stranger.send(Command.TASK_REPLY, task_id=b'1', attempt=b'1', final=b'1', payload=b'x')
        assert stranger.expect(Command.ERROR).args[1] == ErrorCode.UNKNOWN_CLIENT
    answer = status(zmq_broker.endpoint)
    assert answer['orphans'] == 8, answer
    log = zmq_broker.log()
    assert 'without a session' in log


def test_a_hello_with_a_live_sessions_routing_id_and_no_secret_is_refused(zmq_broker):
    """The victim's connection is gone (its pipe closed) but its session lives: its routing id saying HELLO again
    without the secret is refused, and the session keeps its secret."""
    routing_id = b'c' + b'5' * 32
    holder = Peer(zmq_broker.endpoint, routing_id=routing_id)
    secret = _welcome_secret(holder.hello(b'holder'))
    holder.close()
    reply = hello_anew(zmq_broker.endpoint, routing_id, b'thief', b'')
    assert reply.command is Command.ERROR, reply
    assert argument(reply, 'code') == ErrorCode.SESSION_TAKEN and b'secret' in argument(reply, 'text')
    assert hello_anew(zmq_broker.endpoint, routing_id, b'holder', secret).command is Command.WELCOME  # it comes back


def hello_anew(endpoint: str, routing_id: bytes, name: bytes, secret: bytes) -> protocol.Message:
    """HELLO from a new connection with ``routing_id``: ZeroMQ attaches no second connection with a routing id while
    the first one's is still open on the broker's side, and there is no event for when it closes: a fresh connection
    each time, at most 20."""
    for _ in range(20):
        with Peer(endpoint, routing_id=routing_id) as peer:
            peer.send(Command.HELLO, name=name, heartbeat_ms=b'5000', reclaim=b'', pid=b'0', secret=secret)
            with contextlib.suppress(TimeoutError):
                return peer.expect(Command.WELCOME, Command.ERROR, timeout=0.5)
    raise TimeoutError(f'no answer to a HELLO from {routing_id!r}')
