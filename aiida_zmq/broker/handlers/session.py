"""Handlers of the session commands: HELLO, HEARTBEAT, BYE, and the end of a session (:func:`drop_client`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ... import protocol
from ...names import printable_id
from ...protocol import Command, ErrorCode
from ..context import Context
from ..peers import Client, Sender


def hello(broker: Context, peer: Sender, args: Sequence[bytes]) -> None:
    """Start a session, or refresh one: the client's list of tasks it holds is authoritative."""
    routing_id = peer.routing_id
    name = bytes(args[0]).decode(errors='replace')
    claimed: dict[int, int] = {}
    for item in bytes(args[2]).split(b','):
        task_id_text, _, attempt_text = item.partition(b':')
        try:
            claimed[int(task_id_text)] = int(attempt_text)
        except ValueError:
            continue
    try:
        pid = int(args[3] or 0)
    except ValueError:
        pid = 0
    secret = broker.sessions.admit(routing_id, bytes(args[4]))
    if secret is None:
        _refuse_hello(broker, peer, name)
        return
    client = broker.clients.get(routing_id)
    known = client is not None
    if client is None and len(broker.clients) >= broker.config.max_sessions:
        text = f'the broker serves {len(broker.clients)} sessions, its maximum (max_sessions): try again later'
        broker.stats['refused_limit'] += 1
        broker.limited_log.warning('HELLO refused: %s', text, key=('limit', 'sessions'))
        broker.intake.send_raw(peer.socket, routing_id, Command.ERROR, b'', ErrorCode.LIMIT, text.encode())
        return
    if client is None:
        client = broker.clients[routing_id] = Client(
            routing_id, peer.socket, name, last_seen=broker.listening.now, pid=pid
        )
        broker.sessions.bind(client, secret)
    else:
        # The same communicator saying hello again (it lost touch with us): keep its session.
        client.socket, client.last_seen = peer.socket, broker.listening.now
    reclaimed = broker.deliveries.hello(client, claimed, known)
    broker.limited_log.info(
        'client %s connected (%s), reclaimed %d task(s)',
        name,
        printable_id(routing_id),
        reclaimed,
        key=('hello', routing_id),
    )
    broker.send(
        client,
        Command.WELCOME,
        broker.epoch.encode(),
        protocol.number(int(broker.config.heartbeat * 1000)),
        protocol.number(broker.config.max_message_bytes),
        client.secret,
    )


def _refuse_hello(broker: Context, peer: Sender, name: str) -> None:
    """A HELLO for a live session without its secret (another socket with its routing id, or its secret said from
    another routing id): the session stays its owner's (sessions.py)."""
    broker.stats['hellos_refused'] += 1
    broker.limited_log.warning(
        'refused a HELLO from %s (%s): a live session has that routing id or secret, and the HELLO does not carry '
        'its secret',
        name,
        printable_id(peer.routing_id),
        key=('hello-refused', peer.routing_id),
    )
    text = (
        b'this routing id belongs to a live session, and the HELLO does not carry its secret: '
        b'use a routing id of your own (each communicator makes one)'
    )
    broker.intake.send_raw(peer.socket, peer.routing_id, Command.ERROR, b'', ErrorCode.SESSION_TAKEN, text)


def heartbeat(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    pass  # last_seen is updated for every message


def bye(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    broker.limited_log.info(
        'client %s said goodbye, %d held task(s) released',
        client.name,
        len(client.held),
        key=('bye', client.routing_id),
    )
    drop_client(broker, client, released=True, why='its holder said goodbye')


def drop_client(broker: Context, client: Client, *, released: bool, why: str) -> None:
    """Forget a client: its held tasks go back (at once; ``why`` goes into their history), its RPC identifiers free
    up, its callers are told."""
    broker.clients.pop(client.routing_id, None)
    broker.sessions.forget(client)
    broker.outbound.forget(client)
    for queue_name in client.prefetch:
        queue = broker.queues.get(queue_name)
        if queue is not None and client in queue.consumers:
            queue.consumers.remove(client)
            broker.queues.wake(queue_name)  # to forget it, if nothing else holds it
    broker.deliveries.holder_gone(client, released, why)
    for call in broker.rpc.forget(client):
        if call.caller.routing_id in broker.clients:
            broker.send(
                call.caller,
                Command.RPC_UNROUTABLE,
                call.correlation,
                b'the recipient disconnected before it answered',
            )


def without_session(broker: Context, sender: Sender, message: protocol.Message) -> None:
    """A message from a client without a session: the broker restarted, or declared the client dead."""
    if message.command in (Command.TASK_ACK, Command.TASK_REPLY, Command.TASK_NACK):
        # Only the session holding a task may answer it: nothing here says who this is (a routing id is no proof),
        # so the answer is refused and counted; the holder says HELLO with its secret and reclaims the task.
        broker.deliveries.refuse_sessionless_answer(sender.routing_id, message.args)
    broker.intake.no_session(sender.socket, sender.routing_id, message, time.monotonic())
