"""Each task's history in the task store: the events of its life, for ``aiida-zmq tasks show`` and ``explain``.

Events (:data:`EVENTS`): stored, delivered (to which session and process, which delivery), given back (why: its
holder gone or silent, refused, released; and what then: back in the queue, retried later), reclaimed or requeued
after a restart, answered, dead-lettered (why), revived, purged, dropped. A task's ``stored`` event also keeps the
process the task is for (:func:`aiida_zmq.task_payload.process_pk`), so that ``explain PK`` finds a task's history
after the task itself is gone.

The rows are written in one of the broker's batches, in the transaction of a batch that writes anyway (no commit and
no sync of their own): the first such batch once ``write_interval`` seconds passed since the last write or
``write_rows`` events wait, and at close. With fsync on, every page a commit touches is synced: writing the history
of several batches at once costs a page or two per interval rather than per commit. A history never says more than
the store does (it is written after the state it describes); a crash loses the events still waiting (at most those
since the last batch that wrote them), never a task, and a batch that fails drops the events waiting. Reads add the
events still waiting. One B-tree (``WITHOUT ROWID``, by task id then
sequence): the events of recent tasks land in the same few pages.
Bounded: at most ``per_task`` events per task (the oldest after ``stored`` go first), ``max_rows`` in all (the oldest
go first), and events of tasks that are gone are dropped after ``max_age`` seconds. :class:`TaskHistory` belongs to
a :class:`aiida_zmq.store.TaskStore` and uses its connection, from the same thread.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .task_payload import process_pk

__all__ = ('BROKER_LIMITS', 'EVENTS', 'HistoryLimits', 'TaskHistory', 'stopped_task_info')

EVENTS = (
    'stored',
    'delivered',
    'given back',
    'reclaimed',
    'requeued',
    'answered',
    'dead-lettered',
    'revived',
    'purged',
    'dropped',
)
_STATE_NAMES = {0: 'ready', 1: 'delivered', 2: 'dead'}  # the store's READY, DELIVERED, DEAD
_MAX_ID = 2**63 - 1
_ENDS = frozenset({'answered', 'purged', 'dropped'})  # the task is gone: nothing more is counted for it

_SCHEMA = """
DROP TABLE IF EXISTS task_events;
CREATE TABLE IF NOT EXISTS task_history (
    task_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    process INTEGER,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
"""  # task_events: this table's first layout (on main for a few hours): its rows are dropped

Event = tuple[int, int, float, str, str, int | None]  # task id, sequence, when (epoch seconds), event, detail, process


@dataclass(frozen=True)
class HistoryLimits:
    per_task: int = 64  # events kept per task: a task redelivered in a loop keeps its latest ones
    max_rows: int = 200_000  # events in all (about 15 MB)
    max_age: float = 7 * 24 * 3600.0  # events of tasks that are gone are kept this long (seconds)
    prune_interval: float = 60.0  # how often the broker applies max_rows and max_age
    write_interval: float = 0.0  # events wait this long for a batch that writes anyway (0: each batch writes them)
    write_rows: int = 512  # ... or until this many wait


#: The broker's: its batches are many and small (one a confirm), each synced; an offline writer commits once.
BROKER_LIMITS = HistoryLimits(write_interval=0.5)


class TaskHistory:
    """The ``task_events`` table of one store. ``enabled=False`` records nothing (reads still work)."""

    def __init__(self, db: sqlite3.Connection, *, enabled: bool = True, limits: HistoryLimits | None = None) -> None:
        self._db = db
        self.enabled = enabled
        self.limits = limits or HistoryLimits()
        self._db.executescript(_SCHEMA)
        self._staged: list[Event] = []
        self._pending: list[Event] = []  # written in the open transaction, not committed yet
        self._counts: dict[int, int] = {}  # events recorded per live task by this store (for per_task)
        self._trim: set[int] = set()
        self._last_prune = time.monotonic()
        self._last_write = time.monotonic()
        self._seq = self._db.execute('SELECT coalesce(max(seq), 0) FROM task_history').fetchone()[0]

    @property
    def staged(self) -> bool:
        """Events wait to be written."""
        return bool(self._staged or self._trim)

    @property
    def due(self) -> bool:
        """Waiting events are due to be written with the next batch that writes."""
        if not self.staged:
            return False
        return len(self._staged) >= self.limits.write_rows or (
            time.monotonic() - self._last_write >= self.limits.write_interval
        )

    def record(self, task_id: int, event: str, detail: str = '', process: int | None = None) -> None:
        """Stage an event with the batch."""
        if not self.enabled:
            return
        self._seq += 1
        self._staged.append((task_id, self._seq, time.time(), event, detail, process))
        if event in _ENDS:
            self._counts.pop(task_id, None)
            return
        count = self._counts.get(task_id, 0) + 1
        self._counts[task_id] = count
        if count >= self.limits.per_task:
            self._trim.add(task_id)
            self._counts[task_id] = self.limits.per_task // 2

    def forget(self, task_ids: Iterable[int]) -> None:
        """Drop the staged events of these tasks (their insert was rolled back: their ids are reused)."""
        ids = set(task_ids)
        self._staged = [event for event in self._staged if event[0] not in ids]

    # With the store's transaction -----------------------------------------------------------------------------------

    def flush(self, force: bool = False) -> None:
        """Write the waiting events in the open transaction (the store began it), when :attr:`due` or ``force``."""
        if not (force or self.due):
            return
        self._last_write = time.monotonic()
        staged, self._staged = self._staged, []
        self._pending += staged
        if staged:
            self._db.executemany(
                'INSERT INTO task_history (task_id, seq, at, event, detail, process) VALUES (?, ?, ?, ?, ?, ?)', staged
            )
        trim, self._trim = self._trim, set()
        keep = self.limits.per_task // 2
        for task_id in trim:  # the oldest events after `stored` go, so that the latest ones stay
            self._db.execute(
                'DELETE FROM task_history WHERE task_id=? AND seq IN (SELECT seq FROM task_history WHERE task_id=? '
                "AND event!='stored' ORDER BY seq DESC LIMIT -1 OFFSET ?)",
                (task_id, task_id, keep),
            )
        if time.monotonic() - self._last_prune >= self.limits.prune_interval:
            self._prune()

    def _prune(self) -> None:
        self._last_prune = time.monotonic()
        self._db.execute('DELETE FROM task_history WHERE seq <= ?', (self._seq - self.limits.max_rows,))
        self._db.execute(
            'DELETE FROM task_history WHERE at < ? AND task_id NOT IN (SELECT id FROM tasks)',
            (time.time() - self.limits.max_age,),
        )

    def committed(self) -> None:
        self._pending = []

    def rolled_back(self) -> None:
        """The open transaction was rolled back: its events are given up. A batch that failed (disk full) is undone
        in part by the broker (its deliveries did not happen), so its events would not all be true."""
        self._staged = []
        self._pending = []

    # Reads ------------------------------------------------------------------------------------------------------

    def events(self, task_ids: Iterable[int]) -> dict[int, list[dict]]:
        """task id -> its events, oldest first (those written, then those waiting): ``{at, event, detail}``."""
        wanted = set(task_ids)
        waiting: dict[int, list[tuple[float, str, str]]] = {}
        for task_id, _, at, event, detail, _ in self._pending + self._staged:
            if task_id in wanted:
                waiting.setdefault(task_id, []).append((at, event, detail))
        found: dict[int, list[dict]] = {}
        for task_id in sorted(wanted):
            rows = self._db.execute(
                'SELECT at, event, detail FROM task_history WHERE task_id=? ORDER BY seq', (task_id,)
            ).fetchall()
            rows += waiting.get(task_id, [])
            if rows:
                found[task_id] = [{'at': at, 'event': event, 'detail': detail} for at, event, detail in rows]
        return found

    def tasks_of(self, process: int) -> list[int]:
        """The tasks ever stored for this process (as far as the history reaches), oldest first."""
        rows = self._db.execute(
            "SELECT DISTINCT task_id FROM task_history WHERE process=? AND event='stored' ORDER BY task_id", (process,)
        )
        found = {row[0] for row in rows}
        found |= {event[0] for event in self._pending + self._staged if event[5] == process and event[3] == 'stored'}
        return sorted(found)

    def describe(self, task_ids: Iterable[int] = (), processes: Iterable[int] = ()) -> list[dict]:
        """What the store knows of these tasks and of the tasks for these processes (stored now, or gone but still
        in the history), oldest first: ``{id, queue, state, attempts, created, process, ahead, dead_reason, events}``
        (``state`` ``gone`` and only ``id``, ``process`` and ``events`` for a task that is no longer stored;
        ``ahead``: ready tasks of its queue stored before it, for a ready task)."""
        wanted = {task_id for task_id in task_ids if 0 < task_id <= _MAX_ID}
        pks = set(processes)
        if pks:
            for task_id, head in self._db.execute('SELECT id, substr(payload, 1, 4096) FROM tasks'):
                if process_pk(head) in pks:
                    wanted.add(task_id)
            for pk in pks:
                wanted.update(self.tasks_of(pk))
        events = self.events(wanted)
        described = []
        for task_id in sorted(wanted):
            row = self._db.execute(
                'SELECT queue, state, attempts, created, dead_reason, substr(payload, 1, 4096) FROM tasks WHERE id=?',
                (task_id,),
            ).fetchone()
            history = events.get(task_id, [])
            if row is None:
                if history:
                    described.append(
                        {'id': task_id, 'state': 'gone', 'process': self._process(task_id), 'events': history}
                    )
                continue
            queue, state, attempts, created, reason, head = row
            ahead = None
            if state == 0:
                ahead = self._db.execute(
                    'SELECT count(*) FROM tasks WHERE queue=? AND state=0 AND id<?', (queue, task_id)
                ).fetchone()[0]
            described.append(
                {
                    'id': task_id,
                    'queue': queue,
                    'state': _STATE_NAMES.get(state, str(state)),
                    'attempts': attempts,
                    'created': created,
                    'process': process_pk(head),
                    'ahead': ahead,
                    'dead_reason': reason,
                    'events': history,
                }
            )
        return described

    def _process(self, task_id: int) -> int | None:
        row = self._db.execute("SELECT process FROM task_history WHERE task_id=? AND event='stored'", (task_id,))
        found = row.fetchone()
        if found is not None:
            return found[0]
        waiting = [e[5] for e in self._pending + self._staged if e[0] == task_id and e[3] == 'stored']
        return waiting[0] if waiting else None

    def row_count(self) -> int:
        return self._db.execute('SELECT count(*) FROM task_history').fetchone()[0]


def stopped_task_info(history: TaskHistory, ids: Iterable[int] | None, processes: Iterable[int] | None) -> dict:
    """The ADMIN ``task-info`` answer from the store of a broker that is not running: nobody holds a task and none
    backs off; a delivered one waits for its holder to reclaim it when the broker starts (an orphan)."""
    tasks = history.describe(ids or (), processes or ())
    for task in tasks:
        task.update(holder=None, retry_at=None, orphan=task['state'] == 'delivered')
    return {'tasks': tasks, 'rpc': {}, 'peer_timeout': None}
