"""What one client can make the broker hold, and what reaches its log and terminals (issue 21 items 1, 4 and 5).

A second red team, on 917f59f: answers echoing an 8 MiB correlation or identifier to a socket that never reads held
1.5 GiB outside `--outbound-bytes`; 8 MiB client names, 256 KiB queue names, RPC registrations and never-answered
calls had no bound; `status` grew with all of it; names with newlines and terminal escapes forged lines in the log
and in `aiida-zmq status`. Each test is that attack through the wire protocol against a real `aiida-zmq serve`.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest

from aiida_zmq.protocol import Command, ErrorCode
from aiida_zmq.testing import wait_until

from .hostile_peers import Peer, admin_peer, argument, log_size, rss, status

MIB = 1024 * 1024
BIG = b'7' * MIB


def session_of(peer: Peer, routing_id: bytes) -> bytes:
    """What a sessionless request names as its session: the secret (AZMQ/3), the routing id before it."""
    return peer.secret or routing_id


def malformed(endpoint: str) -> int:
    return status(endpoint)['stats'].get('malformed', 0)


@pytest.mark.parametrize('variant', ['publish-correlation', 'rpc-submit-identifier', 'task-submit-correlation'])
def test_answers_echoing_large_fields_to_a_socket_that_never_reads_are_bounded(zmq_broker, variant):
    """Before: 150 requests echoing 1 MiB each held about 150 MiB in the broker until the socket closed."""
    routing_id = b'c' + b'a' * 32
    owner = Peer(zmq_broker.endpoint, routing_id=routing_id)
    owner.hello(b'owner')
    before = malformed(zmq_broker.endpoint)
    baseline = rss(zmq_broker.pid)
    deaf = Peer(zmq_broker.endpoint, rcvhwm=1)  # never reads
    for n in range(150):
        if variant == 'publish-correlation':
            deaf.send(Command.PUBLISH, correlation=BIG + b'%d' % n, payload=b'x')
        elif variant == 'rpc-submit-identifier':
            session = session_of(owner, routing_id)
            deaf.send(Command.RPC_SUBMIT, correlation=b'%d' % n, session=session, identifier=BIG, payload=b'x')
        else:
            deaf.send(Command.TASK_SUBMIT, correlation=BIG, session=b'', queue=b'q', no_reply=b'1', payload=b'x')
    # Once the broker has read all 150 (what waits in ZeroMQ's queue from the peer before that is bounded by
    # --max-message-bytes and RCVHWM, as for any message): what it holds for the socket that does not read.
    wait_until(lambda: malformed(zmq_broker.endpoint) - before >= 150, 30, what='the 150 requests read')
    growth = rss(zmq_broker.pid) - baseline
    assert growth < 32 * MIB, f'the broker holds {growth / MIB:.0f} MiB more'
    deaf.close()
    owner.close()


def test_a_field_past_its_bound_is_refused_with_a_clear_error(zmq_broker):
    with Peer(zmq_broker.endpoint) as client:
        client.hello(b'client')
        client.send(Command.CONSUME, correlation=b'k', queue=b'q' * 300, prefetch=b'1')
        error = client.expect(Command.ERROR, Command.DONE, correlation=b'k')
        assert error.command is Command.ERROR and argument(error, 'code') == ErrorCode.MALFORMED, error
        assert b'queue' in argument(error, 'text') and b'255' in argument(error, 'text')
        client.send(Command.RPC_REGISTER, correlation=b'r', identifier=b'i' * 300)
        error = client.expect(Command.ERROR, Command.RPC_REGISTERED, correlation=b'r')
        assert error.command is Command.ERROR and b'identifier' in argument(error, 'text')
        # A correlation past its bound is not echoed: the answer has none, and says why.
        client.send(Command.CONSUME, correlation=b'c' * 300, queue=b'q', prefetch=b'1')
        error = client.expect(Command.ERROR, Command.DONE)
        assert error.command is Command.ERROR and argument(error, 'correlation') == b''
        assert b'correlation' in argument(error, 'text')


def test_large_hello_names_are_refused_and_status_stays_small(zmq_broker):
    """Before: 20 HELLO names of 8 MiB: RSS +159 MiB, log +160 MiB, a `status` answer of 160 MiB."""
    before = log_size(zmq_broker.log_path)
    for _ in range(5):
        with Peer(zmq_broker.endpoint) as client:
            reply = client.hello(b'n' * MIB)
            assert reply.command is Command.ERROR, reply
            assert b'name' in argument(reply, 'text')
    answer = status(zmq_broker.endpoint)
    assert len(json.dumps(answer)) < 64 * 1024
    assert log_size(zmq_broker.log_path) - before < 20_000


def test_status_lists_the_largest_queues_and_counts_the_rest(zmq_broker):
    """Before: 1,000 queues made `status` list all of them (500 MB with 256 KiB names)."""
    with Peer(zmq_broker.endpoint) as client:
        client.hello(b'many')
        for n in range(400):
            client.send(Command.TASK_SEND, correlation=b'%d' % n, queue=b'q-%04d' % n, no_reply=b'1', payload=b'x')
        for n in range(400):
            client.expect(Command.TASK_CONFIRM, correlation=b'%d' % n)
        client.send(Command.TASK_SEND, correlation=b'big', queue=b'q-0399', no_reply=b'1', payload=b'x')
        client.expect(Command.TASK_CONFIRM, correlation=b'big')
        answer = client.admin('status')
    assert len(answer['queues']) == 100
    assert answer['queues_not_listed'] == 300
    assert answer['queues']['q-0399']['depth'] == 2  # the deepest first
    assert len(json.dumps(answer)) < 64 * 1024


def test_rpc_registrations_of_one_client_are_bounded(zmq_broker):
    """Before: 372k RPC_REGISTER in 15 s, +79 MiB, no limit."""
    with Peer(zmq_broker.endpoint) as client:
        client.hello(b'registrar')
        for n in range(10_050):
            client.send(Command.RPC_REGISTER, correlation=b'%d' % n, identifier=b'rpc-%d' % n)
        answers = [client.expect(Command.RPC_REGISTERED, Command.ERROR, timeout=10) for _ in range(10_050)]
    refused = [answer for answer in answers if answer.command is Command.ERROR]
    assert len(refused) == 50, len(refused)
    assert argument(refused[0], 'code') == ErrorCode.LIMIT and b'10000' in argument(refused[0], 'text')


def test_open_calls_of_one_client_are_bounded(zmq_broker):
    """Before: 270k never-answered calls, +55 MiB, no limit."""
    with Peer(zmq_broker.endpoint) as server, Peer(zmq_broker.endpoint) as caller:
        server.hello(b'deaf-server')
        server.send(Command.RPC_REGISTER, correlation=b'r', identifier=b'deaf')
        server.expect(Command.RPC_REGISTERED, correlation=b'r')
        caller.hello(b'caller')
        for n in range(10_050):
            caller.send(Command.RPC_CALL, correlation=b'%d' % n, identifier=b'deaf', payload=b'x')
        answers = [caller.expect(Command.DONE, Command.ERROR, timeout=10) for _ in range(10_050)]
    refused = [answer for answer in answers if answer.command is Command.ERROR]
    assert len(refused) == 50, len(refused)
    assert argument(refused[0], 'code') == ErrorCode.LIMIT


# --------------------------------------------------------------------------------------------------------------------
# Names with control characters (item 5)

FORGED_NAME = b'w\n2031-01-01 00:00:00,000 ERROR aiida_zmq.server: FORGED\x1b[2J'
FORGED_QUEUE = b'q\n    fake-queue: 99 waiting\x1b]0;PWNED\x07'


def test_names_with_control_characters_are_refused_where_they_arrive(zmq_broker):
    with Peer(zmq_broker.endpoint) as client:
        reply = client.hello(FORGED_NAME)
        assert reply.command is Command.ERROR and b'control character' in argument(reply, 'text'), reply
        assert client.hello(b'honest').command is Command.WELCOME
        requests = [
            (Command.CONSUME, {'queue': FORGED_QUEUE, 'prefetch': b'1'}),
            (Command.TASK_SEND, {'queue': FORGED_QUEUE, 'no_reply': b'1', 'payload': b'x'}),
            (Command.RPC_REGISTER, {'identifier': FORGED_QUEUE}),
            (Command.TASK_GET, {'queue': FORGED_QUEUE}),
        ]
        for n, (command, arguments) in enumerate(requests):
            client.send(command, correlation=b'%d' % n, **arguments)
            error = client.expect(correlation=b'%d' % n)
            assert error.command is Command.ERROR, (command, error)
            assert argument(error, 'code') == ErrorCode.MALFORMED and b'control character' in argument(error, 'text')
        answer = client.admin('status')
    assert not any('\n' in name or '\x1b' in name for name in answer['queues'])
    log = zmq_broker.log()
    assert '\x1b' not in log and '\x07' not in log
    assert not [line for line in log.splitlines() if line.startswith('2031-01-01')]


def test_names_already_stored_are_printed_escaped(zmq_broker_factory, tmp_path):
    """A store written before names were checked can hold any queue name: the CLI prints it escaped."""
    broker = zmq_broker_factory()
    with admin_peer(broker.endpoint):
        pass
    broker.stop()
    database = sqlite3.connect(broker.data_dir / 'tasks.sqlite3')
    with database:
        for state in (0, 2):
            database.execute(
                'INSERT INTO tasks (queue, payload, no_reply, attempts, state, created, dead_reason) '
                'VALUES (?, ?, 1, 0, ?, ?, ?)',
                (FORGED_QUEUE.decode(), b'x', state, time.time(), 'reason\x1b[2J' if state else None),
            )
    database.close()
    broker.start()
    command = [sys.executable, '-m', 'aiida_zmq.cli']
    where = ['--data-dir', str(broker.data_dir)]
    for arguments in (['status'], ['tasks', 'list'], ['dead-letter', 'list']):
        done = subprocess.run([*command, *arguments, *where], check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (arguments, done.stdout, done.stderr)
        out = done.stdout
        assert '\x1b' not in out and '\x07' not in out, (arguments, out)
        assert not [line for line in out.splitlines() if line.strip().startswith('fake-queue')], (arguments, out)


def test_sessions_past_the_broker_limit_are_refused(tmp_path_factory):
    """Before: 2,000 sessions held +66 MiB and 2,018 descriptors, bounded only by the peer timeout. An in-process
    broker with a small ``max_sessions`` (the default, 4,096, would need as many sockets here)."""
    from aiida_zmq.broker.config import BrokerConfig
    from aiida_zmq.broker.server import Broker

    base = tempfile.mkdtemp(prefix='azls-')
    endpoint = f'ipc://{base}/b.sock'
    broker = Broker(f'{base}/data', [endpoint], BrokerConfig(max_sessions=5)).start_in_thread()
    peers = [Peer(endpoint) for _ in range(6)]
    try:
        replies = [peer.hello(b'session-%d' % n) for n, peer in enumerate(peers)]
        assert [reply.command for reply in replies[:5]] == [Command.WELCOME] * 5
        assert replies[5].command is Command.ERROR and argument(replies[5], 'code') == ErrorCode.LIMIT
        assert b'max_sessions' in argument(replies[5], 'text')
        peers[0].send(Command.BYE)
        with Peer(endpoint) as again:  # a place is free again once a session ended
            assert wait_until(lambda: again.hello(b'again').command is Command.WELCOME, 5)
    finally:
        for peer in peers:
            peer.close()
        broker.stop()
        shutil.rmtree(base, ignore_errors=True)
