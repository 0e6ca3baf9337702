"""Handlers of the task commands: TASK_SEND / TASK_SUBMIT (stored in the batch, confirmed after its commit),
CONSUME, CANCEL, TASK_GET, and the answers of a holder (TASK_REPLY, TASK_ACK, TASK_NACK). What happens to a delivery
is decided in ``deliveries.py``; these read the message, and answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ... import protocol
from ...exceptions import StoreError
from ...protocol import Command, ErrorCode
from ...store import StoredTask
from ..context import Context, Peer
from ..peers import Client
from ..queues import QueueState
from ..sessions import reply_address

LOGGER = logging.getLogger(__name__)


def send(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, queue_name, no_reply, payload = args
    store_task(broker, client, correlation, queue_name, no_reply == protocol.FLAG_TRUE, client, payload)


def submit(broker: Context, sender: Peer, args: Sequence[bytes]) -> None:
    """A task from a caller thread's own socket (no session): the result goes to the session it names."""
    correlation, session, queue_name, no_reply, payload = args
    owner = broker.sessions.named(bytes(session))
    if owner is None and session:
        # Not a live session's secret (yet: the broker restarted and the session has not said HELLO again).
        broker.answer(sender, Command.ERROR, correlation, ErrorCode.UNKNOWN_CLIENT, b'no such session: say HELLO')
        return
    store_task(broker, sender, correlation, queue_name, no_reply == protocol.FLAG_TRUE, owner, payload)


def store_task(
    broker: Context,
    peer: Peer,
    correlation: bytes,
    queue_name: bytes,
    no_reply: bool,
    session: Client | None,
    payload: bytes,
) -> None:
    """Store a task in this batch; its confirm goes to ``peer`` once the batch is committed.

    ``session`` is the sender's session: it gets the task's results (unless ``no_reply``), and the confirm says
    whether the task went to that same session in this batch.
    """
    name = bytes(queue_name).decode()
    queue = broker.queues.open(name)
    if queue is None:
        broker.stats['refused_queue_limit'] += 1
        text = (
            f'the broker holds its maximum of {broker.config.max_queues} queues (max_queues): a task for a new queue '
            'is refused until some queue is empty and nobody consumes it'
        )
        broker.limited_log.warning('%s (queue %r)', text, name[:80], key=('queue-limit',))
        broker.answer(peer, Command.ERROR, correlation, ErrorCode.STORE, text.encode())
        return
    reply_to = None if no_reply or session is None else reply_address(session)
    try:
        task_id = broker.store.insert(name, payload, no_reply, reply_to, correlation)
    except StoreError as exception:
        broker.limited_log.error('%s', exception, key=('store',))
        broker.answer(peer, Command.ERROR, correlation, ErrorCode.STORE, str(exception).encode())
        return
    task = StoredTask(task_id, name, payload, no_reply, reply_to, correlation, 0)
    queue.add_new(task, broker.config)
    broker.queues.wake(name)
    broker.batch.stored(task, peer, correlation, None if session is None else session.routing_id)
    broker.stats['tasks_stored'] += 1


def consume(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, queue_name, prefetch_text = args
    name = bytes(queue_name).decode()
    prefetch = protocol.to_int(prefetch_text)
    if prefetch < 0:
        raise protocol.ProtocolError(f'prefetch must be 0 (unlimited) or more, got {prefetch}')
    if name not in client.prefetch and len(client.prefetch) >= broker.config.max_queues_per_client:
        _refuse_consume(
            broker,
            client,
            correlation,
            f'this client consumes {len(client.prefetch)} queues, the most one client may '
            f'(max_queues_per_client={broker.config.max_queues_per_client}): cancel one first',
        )
        return
    queue = broker.queues.open(name)
    if queue is None:
        _refuse_consume(
            broker,
            client,
            correlation,
            f'the broker holds its maximum of {broker.config.max_queues} queues (max_queues): a new queue can be '
            'consumed once some queue is empty and nobody consumes it',
        )
        return
    client.prefetch[name] = prefetch
    if client not in queue.consumers:
        queue.consumers.append(client)
    broker.queues.wake(name)
    broker.send(client, Command.DONE, correlation)


def _refuse_consume(broker: Context, client: Client, correlation: bytes, text: str) -> None:
    broker.stats['refused_queue_limit'] += 1
    broker.limited_log.warning('client %s: CONSUME refused: %s', client.name, text, key=('queue-limit', client))
    broker.send(client, Command.ERROR, correlation, ErrorCode.LIMIT, text.encode())


def cancel(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, queue_name = args
    name = bytes(queue_name).decode()
    client.prefetch.pop(name, None)
    queue = broker.queues.get(name)
    if queue is not None and client in queue.consumers:
        queue.consumers.remove(client)
        broker.queues.wake(name)  # to forget it, if nothing else holds it
    broker.send(client, Command.DONE, correlation)


def get(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    correlation, queue_name = args
    name = bytes(queue_name).decode()
    if not broker.store_fault.writable():  # handing out a task needs a commit
        text = broker.store_fault.text(broker.data_dir)
        broker.send(client, Command.ERROR, correlation, ErrorCode.STORE, text.encode())
        return
    queue = broker.queues.get(name)
    task = broker.deliveries.next_task(queue) if queue is not None else None
    if queue is not None:
        broker.queues.wake(name)  # emptied by this get, it may be forgotten
    if task is None:
        broker.send(client, Command.TASK_GOT, correlation, b'', b'0', b'0', b'')
        return
    deliver(broker, client, task, Command.TASK_GOT, correlation)


def deliver(broker: Context, client: Client, task: StoredTask, command: Command, first: bytes) -> None:
    """Hand ``task`` to ``client``; the message goes out after the batch's commit."""
    broker.deliveries.deliver(client, task, fetched=command is Command.TASK_GOT)
    broker.batch.delivered(client, task, command, first)


def hand_out(broker: Context) -> bool:
    """Hand out tasks of the queues woken in this batch: at most ``send_hwm`` deliveries and half the outbound byte
    budget per consumer per turn, which ZeroMQ's queue to a consumer that reads takes at once (a burst of a whole
    backlog, for a consumer without prefetch limit, would sit in its outbound queue and end its session by its size
    alone). Returns whether a consumer that had its burst has more waiting: the next turn should come at once."""
    handed: dict[Client, list[int]] = {}
    byte_burst = max(1, broker.config.outbound_bytes // 2)
    send_hwm = broker.config.send_hwm

    def may_take(consumer: Client) -> bool:
        count, size = handed.get(consumer, (0, 0))
        return count < send_hwm and size < byte_burst

    def hand(consumer: Client, task: StoredTask, queue: QueueState) -> None:
        totals = handed.setdefault(consumer, [0, 0])
        totals[0] += 1
        totals[1] += len(task.payload)
        deliver(broker, consumer, task, Command.TASK_DELIVER, queue.name.encode())

    return broker.queues.dispatch(time.monotonic(), broker.deliveries.next_task, hand, may_take)


def send_delivery(broker: Context, client: Client, task: StoredTask, command: Command, first: bytes) -> None:
    """Send a delivery of the batch, after its commit."""
    if not client.held.holds(task):
        return  # taken back before the commit (the client left or released it in the same batch)
    broker.send(
        client,
        command,
        first,
        protocol.number(task.id),
        protocol.number(task.attempts),
        protocol.flag(task.no_reply),
        task.payload,
    )


def _held(broker: Context, client: Client, args: Sequence[bytes]) -> StoredTask | None:
    return broker.deliveries.answered(client, protocol.to_int(args[0]), protocol.to_int(args[1]))


def reply(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    task = _held(broker, client, args)
    if task is None:
        return
    final = args[2] == protocol.FLAG_TRUE
    if final:
        broker.deliveries.finish(client, task)
    forward_result(broker, task, args[3], final)


def ack(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    task = _held(broker, client, args)
    if task is not None:
        broker.deliveries.finish(client, task)


def nack(broker: Context, client: Client, args: Sequence[bytes]) -> None:
    task = _held(broker, client, args)
    if task is not None:
        broker.deliveries.nack(client, task, rejected=args[2] == protocol.FLAG_TRUE)


def forward_result(broker: Context, task: StoredTask, payload: bytes, final: bool) -> None:
    """A holder's reply goes to the session that sent the task (if it wants results and is still there)."""
    if task.no_reply or task.reply_to is None or task.correlation is None:
        return
    sender = broker.sessions.results_to(task.reply_to)
    if sender is None:
        LOGGER.debug('sender of task %d is gone: its result is dropped', task.id)
        return
    broker.send(sender, Command.TASK_RESULT, task.correlation, protocol.flag(final), payload)
