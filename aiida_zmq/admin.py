"""The broker's ADMIN operations: status, peer-gone, dead letters, task listings and purges.

Requests are small JSON objects with an ``op`` key (``docs/protocol.md``, Administration); each operation runs on
the broker's loop thread, between messages, with the broker's state as it is.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .server import Broker

__all__ = ('OPERATIONS', 'run')

LOGGER = logging.getLogger(__name__)


def status(broker: Broker) -> dict:
    """Queues, clients, counters, dead letters and store size: what `aiida-zmq status` shows."""
    answer = broker.snapshot()
    answer['dead_letters'] = len(broker.store.dead_letters())
    answer['store_bytes'] = broker.store.size_bytes()
    answer['data_dir'] = str(broker.data_dir)
    answer['version'] = __version__
    return answer


def peer_gone(broker: Broker, pid: int) -> dict:
    """A supervisor (the circus plugin) saw process ``pid`` exit: its clients are dead now, not in a minute."""
    gone = [client for client in broker.clients.values() if client.pid == int(pid)]
    requeued = 0
    for client in gone:
        requeued += len(client.held)
        LOGGER.warning(
            'client %s: its process %d exited, %d held task(s) go back to their queues',
            client.name,
            client.pid,
            len(client.held),
        )
        broker._drop_client(client, released=False)
    return {'clients': len(gone), 'requeued': requeued}


def dead_letters(broker: Broker, queue: str | None = None) -> dict:
    """List dead-lettered tasks (id, queue, deliveries, reason)."""
    rows = broker.store.dead_letters(queue)
    return {'dead_letters': [{'id': i, 'queue': q, 'attempts': a, 'reason': r} for i, q, a, r in rows]}


def dead_letters_requeue(broker: Broker, ids: list[int] | None = None) -> dict:
    """Put dead-lettered tasks (all when `ids` is null) back in their queues with a fresh delivery count."""
    revived = broker.store.revive_dead(ids)
    for task in broker.store.load_tasks(revived):
        broker._queue(task.queue).put_back(task)
    LOGGER.info('%d dead-lettered task(s) requeued by request', len(revived))
    return {'requeued': len(revived)}


def dead_letters_drop(broker: Broker, ids: list[int] | None = None) -> dict:
    """Delete dead-lettered tasks (all when `ids` is null)."""
    dropped = broker.store.drop_dead(ids)
    LOGGER.info('%d dead-lettered task(s) dropped by request', dropped)
    return {'dropped': dropped}


def tasks(broker: Broker, queue: str | None = None, limit: int = 100) -> dict:
    """List stored tasks, oldest first, without payloads."""
    return {'tasks': broker.store.list_tasks(queue, int(limit))}


def tasks_purge(broker: Broker, queue: str) -> dict:
    """Drop the waiting tasks of a queue (held ones stay with their consumers)."""
    broker._flush_writes()  # requeues of this batch first, so that the purge sees every waiting task
    purged = broker.store.purge_ready(queue)
    state = broker.queues.get(queue)
    if state is not None:
        state.ready.clear()
        state.ready_bytes = 0
        state.backlog = 0
    broker._delayed = [entry for entry in broker._delayed if entry[2].queue != queue]
    heapq.heapify(broker._delayed)
    LOGGER.warning('%d waiting task(s) of queue %s purged by request', purged, queue)
    return {'purged': purged}


OPERATIONS: dict[str, Callable[..., dict]] = {
    'status': status,
    'peer-gone': peer_gone,
    'dead-letters': dead_letters,
    'dead-letters-requeue': dead_letters_requeue,
    'dead-letters-drop': dead_letters_drop,
    'tasks': tasks,
    'tasks-purge': tasks_purge,
}


def run(broker: Broker, request_bytes: bytes) -> dict:
    """Run one ADMIN request (a JSON object with an ``op`` key) and return its answer.

    :raises ValueError, TypeError: for a request that is not valid; the text says why.
    """
    request = json.loads(request_bytes)
    if not isinstance(request, dict):
        raise ValueError('the request must be a JSON object')
    operation = OPERATIONS.get(request.pop('op', None))
    if operation is None:
        raise ValueError(f'unknown operation; known: {", ".join(sorted(OPERATIONS))}')
    return operation(broker, **request)
