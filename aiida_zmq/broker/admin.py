"""The broker's ADMIN operations: status, peer-gone, dead letters, task listings and purges.

Requests are small JSON objects with an ``op`` key (``docs/protocol.md``, Administration); each operation runs on
the broker's loop thread, between messages, with the broker's state as it is. Every argument is checked before an
operation runs (type, range, the operation's own argument names), so that whatever a client sends gets an answer
saying what was expected: ``1e999`` (which JSON reads as infinity), ``10**30`` (past SQLite's integers) and deeply
nested brackets included.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..exceptions import AdminRequestError

if TYPE_CHECKING:
    from .server import Broker

__all__ = ('OPERATIONS', 'AdminRequestError', 'Operation', 'parse')

LOGGER = logging.getLogger(__name__)

MAX_TASK_ID = 2**63 - 1  # SQLite's largest integer
MAX_PID = 2**31 - 1
MAX_LIMIT = 100_000  # rows in one `tasks` answer: about 10 MB of JSON
MAX_IDS = 100_000
MAX_QUEUE_NAME = 64 * 1024


def _describe(value: Any) -> str:
    """A short, safe description of a bad value (no 5,000-digit numbers in an error text)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if value is None:
        return 'null'
    if isinstance(value, float):
        if math.isinf(value):
            return 'a number too large for any integer (JSON reads it as infinity)'
        if math.isnan(value):
            return 'NaN'
        return f'the number {value!r}'
    if isinstance(value, int):
        digits = len(str(abs(value))) if abs(value) < 10**4000 else 4000
        return f'{value}' if digits <= 20 else f'a number of {digits} digits'
    if isinstance(value, str):
        return f'the text {value[:40]!r}' + ('...' if len(value) > 40 else '')
    return f'a JSON {"list" if isinstance(value, list) else "object"}'


def _integer(name: str, value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdminRequestError(f'`{name}` must be an integer from {minimum} to {maximum}, got {_describe(value)}')
    if not minimum <= value <= maximum:
        raise AdminRequestError(f'`{name}` must be an integer from {minimum} to {maximum}, got {_describe(value)}')
    return value


def _pid(value: Any) -> int:
    return _integer('pid', value, 1, MAX_PID)


def _limit(value: Any) -> int:
    return _integer('limit', value, 0, MAX_LIMIT)


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise AdminRequestError(f'`ids` must be a list of task ids or null (all), got {_describe(value)}')
    if len(value) > MAX_IDS:
        raise AdminRequestError(f'`ids` lists {len(value)} tasks, at most {MAX_IDS} at once: split the request')
    return [_integer('ids', item, 1, MAX_TASK_ID) for item in value]


def _queue(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AdminRequestError(f'`queue` must be a queue name (text), got {_describe(value)}')
    if len(value) > MAX_QUEUE_NAME:
        raise AdminRequestError(f'`queue` is {len(value)} characters long, at most {MAX_QUEUE_NAME}')
    try:
        value.encode()
    except UnicodeEncodeError:
        raise AdminRequestError('`queue` is not valid Unicode (it holds a lone surrogate)') from None
    return value


def _required_queue(value: Any) -> str:
    queue = _queue(value)
    if queue is None:
        raise AdminRequestError('`queue` is required: the name of the queue')
    return queue


@dataclass(frozen=True)
class Operation:
    """An ADMIN operation: its function, its arguments (name -> parser of the JSON value, and default) and whether it
    changes the store (then it is answered after the batch's commit)."""

    function: Callable[..., dict]
    arguments: dict[str, tuple[Callable[[Any], Any], Any]]
    required: frozenset[str] = frozenset()
    changes_store: bool = False


def parse(request_bytes: bytes) -> tuple[str, Operation, dict[str, Any]]:
    """Read an ADMIN request: its op, the operation and its checked arguments.

    :raises AdminRequestError: for anything that is not a valid request, with a text that says what is expected.
    """
    try:
        request = json.loads(request_bytes)
    except RecursionError:
        raise AdminRequestError('the request is nested too deeply to be an ADMIN request') from None
    except (ValueError, UnicodeDecodeError) as exception:  # json.JSONDecodeError is a ValueError
        raise AdminRequestError(f'the request is not JSON: {str(exception)[:200]}') from None
    if not isinstance(request, dict):
        raise AdminRequestError('the request must be a JSON object with an "op" key')
    op = request.pop('op', None)
    operation = OPERATIONS.get(op) if isinstance(op, str) else None
    if operation is None:
        raise AdminRequestError(f'unknown operation; known: {", ".join(sorted(OPERATIONS))} (got {_describe(op)})')
    unknown = sorted(name for name in request if name not in operation.arguments)
    if unknown:
        takes = ', '.join(operation.arguments) or 'no arguments'
        raise AdminRequestError(f'`{unknown[0][:40]}` is not an argument of {op}; it takes: {takes}')
    missing = sorted(operation.required - set(request))
    if missing:
        raise AdminRequestError(f'{op} needs `{missing[0]}`')
    arguments = {
        name: parser(request[name]) if name in request else default
        for name, (parser, default) in operation.arguments.items()
    }
    return op, operation, arguments


# The operations -----------------------------------------------------------------------------------------------------


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
    gone = [client for client in broker.clients.values() if client.pid == pid]
    requeued = 0
    for client in gone:
        requeued += len(client.held)
        broker.limited_log.warning(
            'client %s: its process %d exited, %d held task(s) go back to their queues',
            client.name,
            client.pid,
            len(client.held),
            key=('peer-gone', client.routing_id),
        )
        broker.drop_client(client, released=False, why=f'its process {pid} exited (or an operator requeued it)')
    return {'clients': len(gone), 'requeued': requeued}


def dead_letters(broker: Broker, queue: str | None = None) -> dict:
    """List dead-lettered tasks (id, queue, deliveries, reason)."""
    rows = broker.store.dead_letters(queue)
    return {'dead_letters': [{'id': i, 'queue': q, 'attempts': a, 'reason': r} for i, q, a, r in rows]}


def dead_letters_requeue(broker: Broker, ids: list[int] | None = None) -> dict:
    """Put dead-lettered tasks (all when `ids` is null) back in their queues with a fresh delivery count."""
    revived = broker.store.revive_dead(ids)
    broker.deliveries.revive(broker.store.load_tasks(revived))
    broker.limited_log.info('%d dead-lettered task(s) requeued by request', len(revived), key=('admin', 'requeue'))
    return {'requeued': len(revived)}


def dead_letters_drop(broker: Broker, ids: list[int] | None = None) -> dict:
    """Delete dead-lettered tasks (all when `ids` is null)."""
    dropped = broker.store.drop_dead(ids)
    broker.limited_log.info('%d dead-lettered task(s) dropped by request', dropped, key=('admin', 'drop'))
    return {'dropped': dropped}


def tasks(broker: Broker, queue: str | None = None, limit: int = 100) -> dict:
    """List stored tasks, oldest first, without payloads."""
    return {'tasks': broker.store.list_tasks(queue, limit)}


def tasks_purge(broker: Broker, queue: str) -> dict:
    """Drop the waiting tasks of a queue, those backing off included (held ones stay with their consumers)."""
    waiting = broker.store.purge_ready(queue)
    backing_off = broker.deliveries.drop_delayed(queue)
    state = broker.queues.get(queue)
    if state is not None:
        state.clear()
        broker.queues.wake(queue)  # to forget it, if nobody consumes it
    purged = waiting + backing_off
    broker.limited_log.warning(
        '%d waiting task(s) of queue %s purged by request', purged, queue, key=('admin', 'purge', queue)
    )
    return {'purged': purged}


def _pks(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise AdminRequestError(f'`processes` must be a list of process pks, got {_describe(value)}')
    if len(value) > MAX_IDS:
        raise AdminRequestError(f'`processes` lists {len(value)} pks, at most {MAX_IDS} at once: split the request')
    return [_integer('processes', item, 1, MAX_TASK_ID) for item in value]


def task_info(broker: Broker, ids: list[int] | None = None, processes: list[int] | None = None) -> dict:
    """What the broker knows of these tasks, and of the tasks for these processes: the store's view with each task's
    history (``TaskHistory.describe``), who holds it and since when, when a task that backs off is offered again,
    and which session serves each process's RPC identifier (AiiDA's process controller talks to it there)."""
    tasks = broker.store.history.describe(ids or (), processes or ())
    now, wall = time.monotonic(), time.time()
    holders = {task_id: client for client in broker.clients.values() for task_id in client.held.tasks}
    backing_off = broker.deliveries.backing_off()
    for task in tasks:
        client = holders.get(task['id'])
        task['holder'] = None
        if client is not None:
            since = client.held.since.get(task['id'], -math.inf)
            task['holder'] = {
                'name': client.name,
                'pid': client.pid,
                'since': None if since == -math.inf else wall - (now - since),
                'silent_s': now - client.last_seen,
            }
        due = backing_off.get(task['id'])
        task['retry_at'] = None if due is None else wall + (due - now)
        task['orphan'] = task['id'] in broker.deliveries.orphans
    rpc = {}
    for pk in processes or ():
        owner = broker.rpc.owners.get(str(pk))
        rpc[str(pk)] = None if owner is None else {'name': owner.name, 'pid': owner.pid}
    return {'tasks': tasks, 'rpc': rpc, 'peer_timeout': broker.config.peer_timeout}


OPERATIONS: dict[str, Operation] = {
    'status': Operation(status, {}),
    # peer-gone changes memory (the tasks go to others now); the store follows with the batch, even if it fails.
    'peer-gone': Operation(peer_gone, {'pid': (_pid, None)}, frozenset({'pid'})),
    'dead-letters': Operation(dead_letters, {'queue': (_queue, None)}),
    'dead-letters-requeue': Operation(dead_letters_requeue, {'ids': (_ids, None)}, changes_store=True),
    'dead-letters-drop': Operation(dead_letters_drop, {'ids': (_ids, None)}, changes_store=True),
    'tasks': Operation(tasks, {'queue': (_queue, None), 'limit': (_limit, 100)}),
    'tasks-purge': Operation(tasks_purge, {'queue': (_required_queue, None)}, frozenset({'queue'}), True),
    'task-info': Operation(task_info, {'ids': (_ids, None), 'processes': (_pks, None)}),
}
