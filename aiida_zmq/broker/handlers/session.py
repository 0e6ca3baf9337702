"""Handlers of the session commands: HELLO, HEARTBEAT, BYE, and the end of a session (:func:`drop_client`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ... import protocol
from ...protocol import Command
from ..context import Context
from ..peers import Client, Sender
from . import tasks


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
    client = broker.clients.get(routing_id)
    known = client is not None
    if client is None:
        client = broker.clients[routing_id] = Client(
            routing_id, peer.socket, name, last_seen=broker.listening.now, pid=pid
        )
    else:
        # The same communicator saying hello again (it lost touch with us): keep its session.
        client.socket, client.last_seen = peer.socket, broker.listening.now
    reclaimed = broker.deliveries.hello(client, claimed, known)
    broker.limited_log.info(
        'client %s connected (%s), reclaimed %d task(s)',
        name,
        routing_id.decode(errors='replace'),
        reclaimed,
        key=('hello', routing_id),
    )
    broker.send(
        client,
        Command.WELCOME,
        broker.epoch.encode(),
        protocol.number(int(broker.config.heartbeat * 1000)),
        protocol.number(broker.config.max_message_bytes),
    )


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
    if message.command in (Command.TASK_ACK, Command.TASK_REPLY) and message.args:
        # A holder finishing a task it was given before a restart: accepted for an unclaimed orphan.
        try:
            task_id, attempt = protocol.to_int(message.args[0]), protocol.to_int(message.args[1])
        except protocol.ProtocolError:
            return
        final = message.command is Command.TASK_ACK or message.args[2] == protocol.FLAG_TRUE
        accepted, task = broker.deliveries.answered_without_session(sender.routing_id, task_id, attempt, final)
        if accepted:
            if task is not None and message.command is Command.TASK_REPLY:
                tasks.forward_result(broker, task, message.args[3], final=True)
            return
    broker.intake.no_session(sender.socket, sender.routing_id, message, time.monotonic())
