"""The broker's ADMIN operations: status, peer-gone, dead letters, task listings and purges.

Requests are small JSON objects with an ``op`` key (``docs/protocol.md``, Administration); each operation runs on
the broker's loop thread, between messages, with the broker's state as it is, and those that need only the store
run the same code on the store of a stopped broker (:func:`run_stopped`, what the CLI does when no broker runs).
Every argument is checked before an operation runs (type, range, the operation's own argument names), so that
whatever a client sends gets an answer saying what was expected: ``1e999`` (which JSON reads as infinity),
``10**30`` (past SQLite's integers) and deeply nested brackets included.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..exceptions import AdminRequestError
from ..store import TaskStore
from ..store_history import stopped_task_info
from .context import Context

__all__ = ('OPERATIONS', 'Operation', 'parse', 'run', 'run_stopped')

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
    """An ADMIN operation: its function, its arguments (name -> parser of the JSON value, and default), whether it
    changes the store (then it is answered after the batch's commit), and, for one that also runs on the store of a
    stopped broker, its answer when there is no store at all.

    The function is ``function(store, broker, **arguments)``: ``broker`` is the running broker, or None on the
    store of a stopped one (where nothing is in memory and nobody holds a task); written once for both.
    """

    function: Callable[..., dict]
    arguments: dict[str, tuple[Callable[[Any], Any], Any]]
    required: frozenset[str] = frozenset()
    changes_store: bool = False
    without_store: dict[str, Any] | None = None  # None: it needs a running broker


def run(broker: Context, operation: Operation, arguments: dict[str, Any]) -> dict:
    """Run an operation on the running broker."""
    return operation.function(broker.store, broker, **arguments)


def run_stopped(op: str, store: TaskStore | None, **arguments: Any) -> dict:
    """Run operation ``op`` on the store of a stopped broker (``None``: it has no store yet), with the answer the
    running broker would give: the CLI prints the same either way."""
    operation = OPERATIONS[op]
    if operation.without_store is None:
        raise ValueError(f'{op} needs a running broker')
    if store is None:
        return dict(operation.without_store)
    return operation.function(store, None, **arguments)


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


def status(store: TaskStore, broker: Context | None) -> dict:
    """Queues, clients, counters, dead letters and store size: what `aiida-zmq status` shows."""
    assert broker is not None, 'status needs a running broker'
    answer = snapshot(broker)
    answer['dead_letters'] = len(store.dead_letters())
    answer['store_bytes'] = store.size_bytes()
    answer['data_dir'] = str(broker.data_dir)
    answer['version'] = __version__
    return answer


def _largest(broker: Context) -> dict:
    """The ``status_top`` deepest queues and the clients holding the most, and how many are not listed: the answer
    to ``status`` stays small whatever clients made (1,000 queues with long names made it 500 MB, before)."""
    top = broker.config.status_top
    queues = sorted(broker.queues.items(), key=lambda item: (-len(item[1]), item[0]))
    clients = sorted(broker.clients.values(), key=lambda c: (-len(c.held), c.name))
    return {
        'queues': {name: {'depth': len(q), 'consumers': len(q.consumers)} for name, q in queues[:top]},
        'queues_not_listed': max(0, len(queues) - top),
        'clients': [
            {
                'name': c.name,
                'pid': c.pid,
                'held': len(c.held),
                'held_per_queue': dict(itertools.islice(c.held.per_queue.items(), top)),
                'held_ids': sorted(c.held.tasks)[:20],  # the oldest it holds (`aiida-zmq top`)
                'prefetch': dict(itertools.islice(c.prefetch.items(), top)),
                'subscribed': c.subscribed,
            }
            for c in clients[:top]
        ],
        'clients_not_listed': max(0, len(clients) - top),
    }


def snapshot(broker: Context) -> dict:
    """A JSON-able view of the broker's state in memory (the part of the status that needs no store)."""
    config = broker.config
    return {
        'epoch': broker.epoch,
        'pid': os.getpid(),
        'uptime': time.time() - broker.started,
        'endpoints': broker.endpoints,
        **_largest(broker),
        'orphans': len(broker.deliveries.orphans),
        'store_fault': broker.store_fault.status(),
        'stats': {**broker.stats, 'log_lines_suppressed': broker.limited_log.suppressed_total},
        # What the operator chose (`serve` options, or the AiiDA profile's broker options through the watcher).
        'settings': {
            'heartbeat': config.heartbeat,
            'peer_timeout': config.peer_timeout,
            'max_deliveries': config.max_deliveries,
            'max_message_bytes': config.max_message_bytes,
            'max_queues': config.max_queues,
            'outbound_bytes': config.outbound_bytes,
            'fsync': config.fsync,
        },
    }


def peer_gone(store: TaskStore, broker: Context | None, pid: int) -> dict:
    """A supervisor (the circus plugin) saw process ``pid`` exit: its clients are dead now, not in a minute."""
    assert broker is not None, 'peer-gone needs a running broker'
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


def dead_letters(store: TaskStore, broker: Context | None, queue: str | None = None) -> dict:
    """List dead-lettered tasks (id, queue, deliveries, reason)."""
    rows = store.dead_letters(queue)
    return {'dead_letters': [{'id': i, 'queue': q, 'attempts': a, 'reason': r} for i, q, a, r in rows]}


def dead_letters_requeue(store: TaskStore, broker: Context | None, ids: list[int] | None = None) -> dict:
    """Put dead-lettered tasks (all when `ids` is null) back in their queues with a fresh delivery count."""
    revived = store.revive_dead(ids)
    if broker is None:
        return {'requeued': len(revived)}
    broker.deliveries.revive(store.load_tasks(revived))
    broker.limited_log.info('%d dead-lettered task(s) requeued by request', len(revived), key=('admin', 'requeue'))
    return {'requeued': len(revived)}


def dead_letters_drop(store: TaskStore, broker: Context | None, ids: list[int] | None = None) -> dict:
    """Delete dead-lettered tasks (all when `ids` is null)."""
    dropped = store.drop_dead(ids)
    if broker is None:
        return {'dropped': dropped}
    broker.limited_log.info('%d dead-lettered task(s) dropped by request', dropped, key=('admin', 'drop'))
    return {'dropped': dropped}


def tasks(store: TaskStore, broker: Context | None, queue: str | None = None, limit: int = 100) -> dict:
    """List stored tasks, oldest first, without payloads."""
    return {'tasks': store.list_tasks(queue, int(limit))}


def tasks_purge(store: TaskStore, broker: Context | None, queue: str) -> dict:
    """Drop the waiting tasks of a queue, those backing off included (held ones stay with their consumers)."""
    waiting = store.purge_ready(queue)
    if broker is None:
        return {'purged': waiting}
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


def task_info(
    store: TaskStore, broker: Context | None, ids: list[int] | None = None, processes: list[int] | None = None
) -> dict:
    """What the broker knows of these tasks, and of the tasks for these processes: the store's view with each task's
    history (``TaskHistory.describe``), who holds it and since when, when a task that backs off is offered again,
    and which session serves each process's RPC identifier (AiiDA's process controller talks to it there)."""
    if broker is None:  # nobody holds a task and none backs off; a delivered one is an orphan
        return stopped_task_info(store.history, ids, processes)
    tasks = store.history.describe(ids or (), processes or ())
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
    'dead-letters': Operation(dead_letters, {'queue': (_queue, None)}, without_store={'dead_letters': []}),
    'dead-letters-requeue': Operation(
        dead_letters_requeue, {'ids': (_ids, None)}, changes_store=True, without_store={'requeued': 0}
    ),
    'dead-letters-drop': Operation(
        dead_letters_drop, {'ids': (_ids, None)}, changes_store=True, without_store={'dropped': 0}
    ),
    'tasks': Operation(tasks, {'queue': (_queue, None), 'limit': (_limit, 100)}, without_store={'tasks': []}),
    'tasks-purge': Operation(
        tasks_purge, {'queue': (_required_queue, None)}, frozenset({'queue'}), True, without_store={'purged': 0}
    ),
    'task-info': Operation(
        task_info,
        {'ids': (_ids, None), 'processes': (_pks, None)},
        without_store={'tasks': [], 'rpc': {}, 'peer_timeout': None},
    ),
}
