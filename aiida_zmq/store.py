"""The durable task store: one SQLite database in WAL mode per broker.

The broker writes through one open transaction per poll-loop batch (group commit) and confirms tasks to their
senders only after :meth:`TaskStore.commit`. Nothing about a task lives only in memory: a task row exists from the
commit that confirmed it until the commit that follows its acknowledgement. A row's ``state`` says whether the task
waits (READY), was handed to a consumer (DELIVERED, so that after a crash its holder may reclaim it), or was given up
on after too many deliveries (DEAD, the dead-letter queue).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .exceptions import BrokerRunning, StoreError
from .security import ensure_private_dir  # here for the callers that import it from the store

__all__ = ('DEAD', 'DELIVERED', 'READY', 'StoredTask', 'TaskStore', 'broker_lock', 'stopped_store', 'submit_offline')

LOGGER = logging.getLogger(__name__)

READY = 0
DELIVERED = 1
DEAD = 2

STORE_FILENAME = 'tasks.sqlite3'
LOCK_FILENAME = 'broker.lock'
SCHEMA_VERSION = 1

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
    """Durable tasks in SQLite (WAL). Not thread-safe: the broker uses it from its one poll-loop thread."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute('PRAGMA journal_mode=WAL')
            # NORMAL survives a crash of any process (the WAL is in the OS page cache); FULL also survives power loss.
            self._db.execute(f'PRAGMA synchronous={"FULL" if fsync else "NORMAL"}')
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
        except sqlite3.DatabaseError as exception:
            raise StoreError(
                f'cannot open the task store {self.path}: {exception}. {_open_advice(self.path, exception)}'
            )
        self._in_transaction = False
        # Highest task id inserted through this store, and what to call after each commit: the broker's store
        # identity records the high-water mark beside the file (:mod:`aiida_zmq.store_identity`).
        self.high_water = 0
        self.after_commit: Callable[[TaskStore], None] | None = None

    # Transactions -------------------------------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._in_transaction:
            self._db.execute('BEGIN IMMEDIATE')
            self._in_transaction = True

    def commit(self) -> bool:
        """Commit the open batch, if any. Returns whether there was one. Raises :class:`StoreError` on failure."""
        if not self._in_transaction:
            return False
        try:
            self._db.execute('COMMIT')
        except sqlite3.Error as exception:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute('ROLLBACK')
            self._in_transaction = False
            raise StoreError(f'could not commit to the task store {self.path}: {exception}') from exception
        self._in_transaction = False
        if self.after_commit is not None:
            self.after_commit(self)
        return True

    def rollback(self) -> None:
        if self._in_transaction:
            self._db.execute('ROLLBACK')
            self._in_transaction = False

    def close(self) -> None:
        self.commit()
        self._db.close()

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
            raise StoreError(f'could not write to the task store {self.path}: {exception}') from exception
        assert cursor.lastrowid is not None
        self.high_water = max(self.high_water, cursor.lastrowid)
        return cursor.lastrowid

    def mark_delivered(self, deliveries: Iterable[tuple[int, int]]) -> None:
        """Record (attempts, task id) pairs as handed out."""
        self._begin()
        self._db.executemany(f'UPDATE tasks SET state={DELIVERED}, attempts=? WHERE id=?', deliveries)

    def mark_ready(self, requeues: Iterable[tuple[int, int]]) -> None:
        """Record (attempts, task id) pairs as waiting again."""
        self._begin()
        self._db.executemany(f'UPDATE tasks SET state={READY}, attempts=? WHERE id=?', requeues)

    def mark_dead(self, task_id: int, reason: str) -> None:
        self._begin()
        self._db.execute(f'UPDATE tasks SET state={DEAD}, dead_reason=? WHERE id=?', (reason, task_id))

    def delete(self, task_ids: Iterable[int]) -> None:
        self._begin()
        self._db.executemany('DELETE FROM tasks WHERE id=?', ((task_id,) for task_id in task_ids))

    # Reads --------------------------------------------------------------------------------------------------------

    def load_ready(self, queue: str, after_id: int, limit: int) -> list[StoredTask]:
        """Ready tasks of a queue with an id above ``after_id``, oldest first."""
        rows = self._db.execute(
            f'SELECT {_COLUMNS} FROM tasks WHERE queue=? AND state={READY} AND id>? ORDER BY id LIMIT ?',
            (queue, after_id, limit),
        ).fetchall()
        return [_row_to_task(row) for row in rows]

    def load_delivered(self) -> list[StoredTask]:
        """Tasks that were handed out when the broker last stopped: their holders may reclaim them."""
        rows = self._db.execute(f'SELECT {_COLUMNS} FROM tasks WHERE state={DELIVERED} ORDER BY id').fetchall()
        return [_row_to_task(row) for row in rows]

    def ready_counts(self) -> dict[str, int]:
        rows = self._db.execute(f'SELECT queue, count(*) FROM tasks WHERE state={READY} GROUP BY queue').fetchall()
        return dict(rows)

    def dead_letters(self, queue: str | None = None) -> list[tuple[int, str, int, str]]:
        """(id, queue, attempts, reason) of every dead-lettered task."""
        sql = f'SELECT id, queue, attempts, dead_reason FROM tasks WHERE state={DEAD}'
        params: tuple = ()
        if queue is not None:
            sql += ' AND queue=?'
            params = (queue,)
        return self._db.execute(sql + ' ORDER BY id', params).fetchall()

    def revive_dead(self, task_ids: Iterable[int] | None = None) -> list[int]:
        """Put dead-lettered tasks back as ready with a fresh delivery count (all when ``task_ids`` is None).

        Returns the ids revived; the caller puts them in its queues.
        """
        self._begin()
        if task_ids is None:
            ids = [row[0] for row in self._db.execute(f'SELECT id FROM tasks WHERE state={DEAD} ORDER BY id')]
        else:
            wanted = [int(task_id) for task_id in task_ids]
            ids = [
                i
                for i in wanted
                if self._db.execute(f'SELECT 1 FROM tasks WHERE id=? AND state={DEAD}', (i,)).fetchone()
            ]
        self._db.executemany(
            f'UPDATE tasks SET state={READY}, attempts=0, dead_reason=NULL WHERE id=?', ((i,) for i in ids)
        )
        return ids

    def drop_dead(self, task_ids: Iterable[int] | None = None) -> int:
        """Delete dead-lettered tasks (all when ``task_ids`` is None); returns how many."""
        self._begin()
        if task_ids is None:
            return self._db.execute(f'DELETE FROM tasks WHERE state={DEAD}').rowcount
        return sum(
            self._db.execute(f'DELETE FROM tasks WHERE id=? AND state={DEAD}', (int(i),)).rowcount for i in task_ids
        )

    def purge_ready(self, queue: str) -> int:
        """Delete the waiting (ready) tasks of a queue; tasks held by consumers stay. Returns how many."""
        self._begin()
        return self._db.execute(f'DELETE FROM tasks WHERE queue=? AND state={READY}', (queue,)).rowcount

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
        sql = 'SELECT id, queue, state, attempts, length(payload), created FROM tasks'
        params: tuple = ()
        if queue is not None:
            sql += ' WHERE queue=?'
            params = (queue,)
        names = {READY: 'ready', DELIVERED: 'delivered', DEAD: 'dead'}
        rows = self._db.execute(sql + ' ORDER BY id LIMIT ?', (*params, limit)).fetchall()
        return [
            {'id': i, 'queue': q, 'state': names.get(s, str(s)), 'attempts': a, 'bytes': n, 'created': c}
            for i, q, s, a, n, c in rows
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

    Yields ``None`` when there is no store yet (no broker ever ran there) unless ``create``.

    :raises BrokerRunning: when a broker holds the lock (go through the broker instead).
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
        store = TaskStore(directory / STORE_FILENAME)
        try:
            yield store
            store.commit()
        finally:
            store.close()
    os.chmod(directory / STORE_FILENAME, 0o600)


def submit_offline(data_dir: str | os.PathLike[str], queue: str, payload: bytes, no_reply: bool = True) -> int:
    """Write a task straight into the store of a broker that is not running; it is delivered once the broker starts.

    Safe against a broker starting at the same moment: the write happens under the broker's lock.

    :raises BrokerRunning: when a broker holds the lock (send the task through a communicator instead).
    """
    with stopped_store(data_dir, create=True) as store:
        assert store is not None
        return store.insert(queue, payload, no_reply, None, None)
