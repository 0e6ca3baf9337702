"""The durable task store: one SQLite database in WAL mode per broker.

The broker writes through one open transaction per poll-loop batch (group commit) and confirms tasks to their senders
only after :meth:`TaskStore.commit`. Durable by default: the commit returns once the WAL is synced to the disk
(``synchronous=FULL``, one sync per batch), so a confirmed task survives a power cut, not only a crash; ``fsync=False``
(``serve --no-fsync``) skips that sync, and a power cut may then lose the tasks confirmed since the last checkpoint.
Nothing about a task lives only in memory: a task row exists from the commit that confirmed it until the commit that
follows its acknowledgement. A row's ``state`` says whether the task waits (READY), was handed to a consumer (DELIVERED,
so that after a crash its holder may reclaim it), or was given up on after too many deliveries (DEAD, the dead-letter
queue).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import typing as t
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import BrokerRunning, StoreError, StoreReplaced
from .fsync import sync_directory
from .security import ensure_private_dir  # here for the callers that import it from the store
from .store_history import TaskHistory
from .store_identity import IDENTITY_FILENAME, STORE_FILENAME, StoreIdentity
from .task_payload import process_pk

__all__ = (
    'DEAD',
    'DELIVERED',
    'READY',
    'MoveEntry',
    'StoredTask',
    'TaskStore',
    'accept_store',
    'broker_lock',
    'open_offline',
    'peek_moves',
    'stopped_store',
    'submit_offline',
)

LOGGER = logging.getLogger(__name__)

READY = 0
DELIVERED = 1
DEAD = 2

LOCK_FILENAME = 'broker.lock'
SCHEMA_VERSION = 1
MAX_ID = 2**63 - 1  # SQLite's largest integer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload BLOB NOT NULL,
    no_reply INTEGER NOT NULL DEFAULT 0,
    reply_to BLOB,
    correlation BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    state INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    dead_reason TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_queue_state ON tasks (queue, state, id);
"""


@dataclass(slots=True)
class StoredTask:
    """A task as it is stored; the broker keeps these in memory only for a bounded window of each queue."""

    id: int
    queue: str
    payload: bytes
    no_reply: bool
    reply_to: bytes | None
    correlation: bytes | None
    attempts: int
    state: int = READY


_COLUMNS = 'id, queue, payload, no_reply, reply_to, correlation, attempts, state'


def _row_to_task(row: tuple) -> StoredTask:
    return StoredTask(row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6], row[7])


def _open_advice(path: Path, exception: sqlite3.DatabaseError) -> str:
    """What to do when the store cannot be opened. A full or read-only disk is not corruption: moving the file aside
    there would hide good tasks, so each cause gets its own advice."""
    text = str(exception).lower()
    if 'full' in text or 'disk i/o' in text:
        return (
            f'The disk holding {path.parent} is probably full (check `df -h {path.parent}`): free space and start '
            'again; the tasks in the store are kept'
        )
    if 'readonly' in text or 'read-only' in text or 'unable to open' in text:
        return (
            f'{path.parent} is not writable (read-only file system or wrong owner): remount it read-write or fix its '
            'owner, then start again; the tasks in the store are kept'
        )
    return (
        f'If the file is corrupt, stop the broker, move the file aside with the files beside it (`mv '
        f'{path}* SOMEWHERE/`; tasks in it are not delivered until it is repaired, e.g. with sqlite3 .recover) and '
        'start again'
    )


class TaskStore:
    """Durable tasks in SQLite (WAL). Not thread-safe: the broker uses it from its one poll-loop thread.

    ``fsync`` (the default): a commit is synced to the disk before it returns. Without it a commit survives a crash of
    any process (the WAL is in the OS page cache) but not a power cut.

    SQLite runs with ``synchronous=NORMAL`` either way (the WAL is synced before each checkpoint, the main file after
    it); with ``fsync`` the store syncs the WAL file itself after a commit (``fdatasync`` on a descriptor of its own):
    what ``synchronous=FULL`` does, but only for the commits that need it (see :meth:`commit`). SQLite refuses to
    change its safety level inside a transaction, and the broker knows only at the end of a batch whether anyone
    waits for its commit.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True, history: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        created = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute('PRAGMA journal_mode=WAL')
            self._db.execute('PRAGMA synchronous=NORMAL')
            self._db.execute('PRAGMA busy_timeout=10000')
            self._db.executescript(_SCHEMA)
            version = self._db.execute('PRAGMA user_version').fetchone()[0]
            if version == 0:
                self._db.execute(f'PRAGMA user_version={SCHEMA_VERSION}')
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f'{self.path} has store schema {version}, this aiida-zmq reads schema {SCHEMA_VERSION}: '
                    'use the aiida-zmq version that wrote it, or move the file away to start empty'
                )
            check = self._db.execute('PRAGMA quick_check(1)').fetchone()[0]
            if check != 'ok':  # the pragma reports corruption as a row, it does not raise
                raise sqlite3.DatabaseError(f'database disk image is malformed ({check})')
            if created and fsync:  # the new file's name, or a power cut takes the whole store with it
                sync_directory(self.path.parent)
        except sqlite3.DatabaseError as exception:
            raise StoreError(
                f'cannot open the task store {self.path}: {exception}. {_open_advice(self.path, exception)}'
            )
        # Writes of the batch, by task id, last one wins: (state, attempts, dead reason), or None to delete. Staged
        # writes are executed when the batch commits (or before a read that must see them); those executed in the
        # open transaction wait in ``_pending`` until it commits, and go back to ``_staged`` if it does not, so that
        # a batch that fails (disk full) loses nothing the broker still holds in memory: it is written next time.
        self._staged: dict[int, tuple[int, int, str | None] | None] = {}
        self._pending: dict[int, tuple[int, int, str | None] | None] = {}
        self._failure: StoreError | None = None  # the open batch failed: it commits nothing, not even later writes
        # Highest task id inserted through this store and committed, and what to call after each commit: the broker's
        # store identity records the high-water mark beside the file (:mod:`aiida_zmq.store_identity`). An insert
        # counts once its batch commits: a batch rolled back (disk full) frees its ids, the next one reuses them.
        self.high_water = 0
        self._batch_high_water = 0
        self.after_commit: Callable[[TaskStore], None] | None = None
        # Each task's events, written with the batch (aiida_zmq.store_history); ``history=False`` records none.
        self.history = TaskHistory(self._db, enabled=history)
        self._wal: int | None = None  # a descriptor of the -wal file, for syncing it (see _sync)

    # Transactions -------------------------------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._failure is not None:
            raise self._failure  # the batch is lost already: a later write in it must not commit on its own
        if not self._db.in_transaction:
            try:
                self._db.execute('BEGIN IMMEDIATE')
            except sqlite3.Error as exception:
                raise self._fail(exception, 'write to') from exception

    def _fail(self, exception: sqlite3.Error, doing: str) -> StoreError:
        """A statement of the batch failed: SQLite may have rolled the whole transaction back (disk full does), so
        the batch is lost; roll back what is left and remember it, so that its commit fails too."""
        failure = StoreError(f'could not {doing} the task store {self.path}: {exception}')
        self._failure = self._failure or failure
        self._roll_back()
        return failure

    def _roll_back(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                self._db.execute('ROLLBACK')
        self._staged = {**self._pending, **self._staged}
        self._pending = {}
        self._batch_high_water = self.high_water
        self.history.rolled_back()

    @property
    def staged(self) -> int:
        """Writes not committed yet."""
        return len(self._staged) + len(self._pending)

    def _flush(self) -> None:
        """Execute the staged writes in the open transaction (they commit with it)."""
        if not self._staged:
            self._flush_history()
            return
        self._begin()
        staged, self._staged = self._staged, {}
        updates = [(*write, task_id) for task_id, write in staged.items() if write is not None]
        deletes = [(task_id,) for task_id, write in staged.items() if write is None]
        self._pending.update(staged)
        try:
            if updates:
                self._db.executemany('UPDATE tasks SET state=?, attempts=?, dead_reason=? WHERE id=?', updates)
            if deletes:
                self._db.executemany('DELETE FROM tasks WHERE id=?', deletes)
        except sqlite3.Error as exception:
            raise self._fail(exception, 'write to') from exception
        self._flush_history()

    def _flush_history(self, force: bool = False) -> None:
        """The tasks' events join a transaction that is open anyway (none is begun for them, but at ``close``)."""
        if not self._db.in_transaction and not force:
            return
        self._begin()
        try:
            self.history.flush(force)
        except sqlite3.Error as exception:
            raise self._fail(exception, 'write to') from exception

    def commit(self, sync: bool = True) -> bool:
        """Commit the batch: its inserts and staged writes. Returns whether there was anything to commit.

        ``sync=False``: a batch whose commit nobody waits for (acks, deliveries: nothing is confirmed or answered
        after it) is not synced by itself, even with ``fsync``; the next synced commit syncs it too (the WAL is
        synced as a whole, in order). A power cut can then bring back a task that was acknowledged, never lose one
        that was confirmed: RabbitMQ does the same with acks.

        :raises StoreError: when the batch could not be stored (disk full, read-only): nothing of it is; the staged
            writes stay staged (the next commit tries them again), the inserts are gone.
        """
        try:
            if self._failure is not None:
                raise self._failure
            self._flush()
            if not self._db.in_transaction:
                return False
            try:
                self._db.execute('COMMIT')
            except sqlite3.Error as exception:
                raise self._fail(exception, 'commit to') from exception
            self._pending = {}
            self.history.committed()
            if self.fsync and sync:
                self._sync()  # before anything is confirmed, and before the identity record says it is there
            self.high_water = max(self.high_water, self._batch_high_water)
            if self.after_commit is not None:
                self.after_commit(self)
            return True
        except StoreError:
            self._roll_back()
            raise
        finally:
            self._failure = None

    def _sync(self) -> None:
        """Sync the WAL: every commit so far survives a power cut. The file is the same while the connection is
        open (SQLite rewrites it from its start after a checkpoint; it removes it only when the last one closes).

        :raises StoreError: when the disk does not take it (the batch is committed, but must not be confirmed).
        """
        try:
            if self._wal is None:
                self._wal = os.open(f'{self.path}-wal', os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
                sync_directory(self.path.parent)  # the -wal file's name, new with the first write
            os.fdatasync(self._wal)
        except OSError as exception:
            raise StoreError(f'could not sync the task store {self.path}-wal to the disk: {exception}') from exception

    def rollback(self) -> None:
        """Give up the open batch, all of it: its inserts and its staged writes (an interrupted migration must not
        have half a batch committed by a later commit or by :meth:`close`). A batch that failed by itself keeps its
        staged writes for the next commit instead (see :meth:`commit`)."""
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                self._db.execute('ROLLBACK')
        self._staged = {}
        self._pending = {}
        self._batch_high_water = self.high_water
        self._failure = None
        self.history.rolled_back()

    def close(self) -> None:
        try:
            self.commit()
            if self.history.staged:  # the events still waiting for a batch: written now, with a commit of their own
                self._flush_history(force=True)
                self.commit()
        finally:
            self._db.close()
            if self._wal is not None:
                os.close(self._wal)
                self._wal = None

    # Writes (inside the open batch) -----------------------------------------------------------------------------

    def insert(
        self, queue: str, payload: bytes, no_reply: bool, reply_to: bytes | None, correlation: bytes | None
    ) -> int:
        """Add a ready task to the open batch and return its id."""
        self._begin()
        try:
            cursor = self._db.execute(
                'INSERT INTO tasks (queue, payload, no_reply, reply_to, correlation, created) '
                'VALUES (?, ?, ?, ?, ?, ?)',
                (queue, payload, int(no_reply), reply_to, correlation, time.time()),
            )
        except sqlite3.Error as exception:
            raise self._fail(exception, 'write to') from exception
        assert cursor.lastrowid is not None
        self._batch_high_water = max(self._batch_high_water, cursor.lastrowid)
        self.history.record(cursor.lastrowid, 'stored', process=process_pk(payload))
        return cursor.lastrowid

    def stage(self, task_id: int, state: int, attempts: int, reason: str | None = None) -> None:
        """Record the task's state and delivery count with the batch (the last write of a task in a batch wins).
        ``reason`` is why a dead task is dead, or who holds a delivered one (:meth:`delivered_holders`)."""
        self._staged[task_id] = (state, attempts, reason)

    def delete(self, task_ids: Iterable[int]) -> None:
        """Delete these tasks with the batch."""
        for task_id in task_ids:
            self._staged[task_id] = None

    def unstage(self, task_ids: Iterable[int]) -> None:
        """Forget the staged writes of these tasks (tasks whose insert was rolled back: their ids are reused)."""
        task_ids = list(task_ids)
        for task_id in task_ids:
            self._staged.pop(task_id, None)
        self.history.forget(task_ids)

    # Reads --------------------------------------------------------------------------------------------------------

    def load_ready(self, queue: str, after_id: int, limit: int) -> list[StoredTask]:
        """Ready tasks of a queue with an id above ``after_id``, oldest first (as the batch left them so far)."""
        self._flush()
        rows = self._db.execute(
            f'SELECT {_COLUMNS} FROM tasks WHERE queue=? AND state={READY} AND id>? ORDER BY id LIMIT ?',
            (queue, after_id, limit),
        ).fetchall()
        return [_row_to_task(row) for row in rows]

    def load_delivered(self) -> list[StoredTask]:
        """Tasks that were handed out when the broker last stopped: their holders may reclaim them."""
        rows = self._db.execute(f'SELECT {_COLUMNS} FROM tasks WHERE state={DELIVERED} ORDER BY id').fetchall()
        return [_row_to_task(row) for row in rows]

    def delivered_holders(self) -> dict[int, str]:
        """Who held each delivered task: the proof of its holder's session secret, which a delivery stores in the row's
        reason (:meth:`stage`; ``aiida_zmq.broker.sessions``). Rows stored before that have none."""
        rows = self._db.execute(f'SELECT id, dead_reason FROM tasks WHERE state={DELIVERED}').fetchall()
        return {task_id: holder for task_id, holder in rows if holder}

    def ready_counts(self) -> dict[str, int]:
        rows = self._db.execute(f'SELECT queue, count(*) FROM tasks WHERE state={READY} GROUP BY queue').fetchall()
        return dict(rows)

    def dead_letters(self, queue: str | None = None) -> list[tuple[int, str, int, str]]:
        """(id, queue, attempts, reason) of every dead-lettered task (as committed)."""
        sql = f'SELECT id, queue, attempts, dead_reason FROM tasks WHERE state={DEAD}'
        params: tuple = ()
        if queue is not None:
            sql += ' AND queue=?'
            params = (queue,)
        return self._db.execute(sql + ' ORDER BY id', params).fetchall()

    def dead_ids(self, task_ids: Iterable[int] | None = None) -> list[int]:
        """The dead-lettered tasks among ``task_ids`` (all when None), as the batch left them so far."""
        self._flush()
        if task_ids is None:
            return [row[0] for row in self._db.execute(f'SELECT id FROM tasks WHERE state={DEAD} ORDER BY id')]
        return [
            task_id
            for task_id in sorted(set(task_ids))
            if 0 < task_id <= MAX_ID  # no task has another id (and SQLite takes no larger integer)
            and self._db.execute(f'SELECT 1 FROM tasks WHERE id=? AND state={DEAD}', (task_id,)).fetchone()
        ]

    def ready_ids(self, queue: str) -> list[int]:
        """The waiting (ready) tasks of a queue, as the batch left them so far."""
        self._flush()
        return [row[0] for row in self._db.execute(f'SELECT id FROM tasks WHERE queue=? AND state={READY}', (queue,))]

    # Operator actions (ADMIN, on a running broker's store or a stopped one's): staged, written with the commit ------

    def purge_ready(self, queue: str) -> int:
        """Delete the waiting (ready) tasks of a queue; tasks held by consumers stay. Returns how many."""
        ids = self.ready_ids(queue)
        self.delete(ids)
        for task_id in ids:
            self.history.record(task_id, 'purged', 'by an operator (tasks purge)')
        return len(ids)

    def revive_dead(self, task_ids: Iterable[int] | None = None) -> list[int]:
        """Put dead-lettered tasks back as ready with a fresh delivery count (all when ``task_ids`` is None); returns
        the ids revived (a running broker puts them in its queues)."""
        ids = self.dead_ids(task_ids)
        for task_id in ids:
            self.stage(task_id, READY, 0)
            self.history.record(task_id, 'revived', 'from the dead-letter queue by an operator, deliveries reset')
        return ids

    def drop_dead(self, task_ids: Iterable[int] | None = None) -> int:
        """Delete dead-lettered tasks (all when ``task_ids`` is None); returns how many."""
        ids = self.dead_ids(task_ids)
        self.delete(ids)
        for task_id in ids:
            self.history.record(task_id, 'dropped', 'from the dead-letter queue by an operator')
        return len(ids)

    def load_tasks(self, task_ids: Iterable[int]) -> list[StoredTask]:
        """The tasks with these ids, oldest first."""
        tasks = []
        for task_id in sorted(task_ids):
            row = self._db.execute(f'SELECT {_COLUMNS} FROM tasks WHERE id=?', (task_id,)).fetchone()
            if row is not None:
                tasks.append(_row_to_task(row))
        return tasks

    def list_tasks(self, queue: str | None, limit: int) -> list[dict]:
        """A JSON-able listing (no payloads) of stored tasks, oldest first."""
        sql = 'SELECT id, queue, state, attempts, length(payload), created, payload FROM tasks'
        params: tuple = ()
        if queue is not None:
            sql += ' WHERE queue=?'
            params = (queue,)
        names = {READY: 'ready', DELIVERED: 'delivered', DEAD: 'dead'}
        limit = max(-1, min(limit, MAX_ID))  # -1: no limit; SQLite takes no larger integer
        rows = self._db.execute(sql + ' ORDER BY id LIMIT ?', (*params, limit)).fetchall()
        return [
            {
                'id': i,
                'queue': q,
                'state': names.get(s, str(s)),
                'attempts': a,
                'bytes': n,
                'created': c,
                'process': process_pk(p),  # the process a task is for (AiiDA's `continue` tasks), else None
            }
            for i, q, s, a, n, c, p in rows
        ]

    # Identity (see aiida_zmq.store_identity) -------------------------------------------------------------------

    def identity(self) -> str | None:
        """The random identity the broker gave this store, ``None`` if it has none (new, emptied, or older)."""
        self._db.execute('CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)')
        row = self._db.execute("SELECT value FROM store_meta WHERE key='identity'").fetchone()
        return row[0] if row else None

    def set_identity(self, identity: str) -> None:
        self._begin()
        self._db.execute("INSERT OR REPLACE INTO store_meta (key, value) VALUES ('identity', ?)", (identity,))
        self.commit()
        # Into the main file now, not only the WAL: a WAL lost later must not take the identity with it.
        self._db.execute('PRAGMA wal_checkpoint(PASSIVE)')

    def sequence(self) -> int:
        """The highest task id ever given in this store (AUTOINCREMENT never hands out an id twice)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='tasks'").fetchone()
        return int(row[0]) if row else 0

    def task_count(self) -> int:
        return self._db.execute('SELECT count(*) FROM tasks').fetchone()[0]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + '*') if p.exists())

    # The journal of moves from and to core.zeromq (aiida_zmq.core_zeromq_move) --------------------------------------
    # Its tables stand beside ``tasks`` (the broker ignores them) so that a copied task and the entry that says so are
    # written in the same transaction: committed together or not at all.

    def open_move_journal(self) -> str:
        """Create the journal's tables if they are missing; return the id this store signs the tasks it exports with."""
        self._db.executescript(_MOVES_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO core_zeromq_meta (key, value) VALUES ('store_id', ?)", (_new_id(),))
        return self._db.execute("SELECT value FROM core_zeromq_meta WHERE key='store_id'").fetchone()[0]

    def moves(self, direction: str) -> dict[str, MoveEntry]:
        """Core.zeromq task id -> its entry, for the moves ``direction`` (``in`` or ``out``)."""
        return _moves(self._db, direction)

    def record_move(self, direction: str, zeromq_id: str, task_id: int, state: str) -> None:
        """Add or update an entry in the open batch."""
        self._begin()
        self._db.execute(
            'INSERT OR REPLACE INTO core_zeromq_moves (direction, zeromq_id, task_id, state, updated) '
            'VALUES (?, ?, ?, ?, ?)',
            (direction, zeromq_id, task_id, state, time.time()),
        )


class MoveEntry(t.NamedTuple):
    """How far the move of one core.zeromq task got, and its row in the store."""

    task_id: int
    state: str


_MOVES_SCHEMA = """
CREATE TABLE IF NOT EXISTS core_zeromq_moves (
    direction TEXT NOT NULL,
    zeromq_id TEXT NOT NULL,
    task_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (direction, zeromq_id)
);
CREATE TABLE IF NOT EXISTS core_zeromq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _moves(database: sqlite3.Connection, direction: str) -> dict[str, MoveEntry]:
    rows = database.execute(
        'SELECT zeromq_id, task_id, state FROM core_zeromq_moves WHERE direction=?', (direction,)
    ).fetchall()
    return {zeromq_id: MoveEntry(task_id, state) for zeromq_id, task_id, state in rows}


def peek_moves(path: str | os.PathLike[str], direction: str) -> tuple[str | None, dict[str, MoveEntry]]:
    """The store id and the journal's entries, read-only (a dry run): nothing when there is no store or journal yet."""
    try:
        database = sqlite3.connect(f'file:{path}?mode=ro', uri=True, timeout=10.0)
    except sqlite3.Error:
        return None, {}
    try:
        entries = _moves(database, direction)
        store_id = database.execute("SELECT value FROM core_zeromq_meta WHERE key='store_id'").fetchone()
    except sqlite3.Error:  # no store file, or a store without a journal: nothing was ever moved
        return None, {}
    finally:
        database.close()
    return (store_id[0] if store_id else None), entries


@contextlib.contextmanager
def broker_lock(data_dir: str | os.PathLike[str], *, blocking: bool, timeout: float = 30.0) -> Iterator[int]:
    """Hold the data directory's exclusive lock: the broker holds it while it runs, an offline submit while it writes.

    The lock file is removed on release, so that a stopped broker leaves nothing behind. Removing a lock file that
    others may be waiting on is safe only with a check after locking: a waiter that wins the lock on a file that was
    unlinked meanwhile holds a lock nobody else can see, so it lets go and tries again on the file that is there now.

    :raises BrokerRunning: when ``blocking`` is false and someone else holds the lock.
    """
    path = Path(data_dir) / LOCK_FILENAME
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not blocking:
                raise BrokerRunning(f'a broker is running on {data_dir}: send tasks through it') from None
            if time.monotonic() > deadline:
                raise StoreError(
                    f'{path} is held by another process for more than {timeout:.0f}s: is another broker running '
                    'on the same data directory? Stop it first (one broker per data directory).'
                ) from None
            # flock has no timeout of its own; the holder is either a broker (long) or an offline submit (ms).
            time.sleep(0.05)
            continue
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the file we locked was removed by its previous holder: lock the one that is there now
    try:
        yield fd
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock: nobody else holds this file
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def stopped_store(data_dir: str | os.PathLike[str], *, create: bool = False) -> Iterator[TaskStore | None]:
    """The task store of a broker that is not running, under the broker's lock while the block runs; committed at
    the end. A broker that starts meanwhile waits for the lock (``--lock-timeout``): keep the block short.

    Yields ``None`` when there is no store yet (no broker ever ran there) unless ``create``. The store is checked
    and its identity record kept, synced, as the broker does (:mod:`aiida_zmq.store_identity`): a store filled
    offline and then truncated is refused at start like one the broker served.

    :raises BrokerRunning: when a broker holds the lock (go through the broker instead).
    :raises aiida_zmq.exceptions.StoreReplaced: when the store is not the one the broker left.
    """
    directory = Path(data_dir)
    if not create and not (directory / STORE_FILENAME).exists():
        yield None
        return
    directory = ensure_private_dir(directory)
    with broker_lock(directory, blocking=False):
        if not create and not (directory / STORE_FILENAME).exists():  # removed before we held the lock
            yield None
            return
        store = open_offline(directory / STORE_FILENAME)
        try:
            yield store
            store.commit()
        finally:
            store.close()
    os.chmod(directory / STORE_FILENAME, 0o600)


def open_offline(path: str | os.PathLike[str]) -> TaskStore:
    """Open the store of a stopped broker for an offline writer (under the broker's lock: :func:`stopped_store`,
    a move): checked, and its identity record kept, each update synced, as the broker keeps it.

    :raises aiida_zmq.exceptions.StoreReplaced: when the store is not the one the broker left (or is missing beside
        its record: it is not created empty then).
    """
    identity = StoreIdentity(Path(path).parent, sync=True)
    identity.check_before_open()
    store = TaskStore(path)
    try:
        identity.verify_and_adopt(store)
    except BaseException:
        store.close()
        raise
    return store


def submit_offline(data_dir: str | os.PathLike[str], queue: str, payload: bytes, no_reply: bool = True) -> int:
    """Write a task straight into the store of a broker that is not running; it is delivered once the broker starts.

    Safe against a broker starting at the same moment: the write happens under the broker's lock.

    :raises BrokerRunning: when a broker holds the lock (send the task through a communicator instead).
    """
    with stopped_store(data_dir, create=True) as store:
        assert store is not None
        return store.insert(queue, payload, no_reply, None, None)


def accept_store(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Make the store in ``data_dir``, as it is now, the one the broker accepts (a new identity record).

    Under the broker's lock, so never while a broker runs.

    :raises aiida_zmq.exceptions.BrokerRunning: when a broker holds the data directory.
    """
    _refuse_without_store(Path(data_dir))
    directory = ensure_private_dir(data_dir)
    with broker_lock(directory, blocking=False):
        _refuse_without_store(directory)  # removed before we held the lock
        identity = StoreIdentity(directory, sync=True)
        with contextlib.suppress(StoreReplaced):
            identity.read()
        expected = identity.high_water
        with contextlib.closing(TaskStore(directory / STORE_FILENAME)) as store:
            identity.identity = None  # whatever the record said: the store as it is now is the one
            identity.verify_and_adopt(store)
            count = store.task_count()
        identity.close()
    os.chmod(directory / STORE_FILENAME, 0o600)
    LOGGER.info('store %s accepted as it is: %d task(s), ids up to %d', directory, count, identity.high_water)
    return {'tasks': count, 'high_water': identity.high_water, 'recorded_before': expected}


def _refuse_without_store(directory: Path) -> None:
    """Accepting a directory with no store would create an empty one and call it accepted (a typo in the path)."""
    if (directory / STORE_FILENAME).is_file():
        return
    if (directory / IDENTITY_FILENAME).exists():
        raise StoreError(
            f'{directory / STORE_FILENAME} is missing (its identity record is there): put the file back, or, to start '
            f'with an empty store, move {directory / IDENTITY_FILENAME} aside and start the broker'
        )
    what = 'does not exist' if not directory.exists() else f'has no task store ({STORE_FILENAME})'
    raise StoreError(
        f'{directory} {what}: nothing to accept. Is it the data directory the broker refused? (its message names it; '
        '`aiida-zmq status` shows the one in use)'
    )
