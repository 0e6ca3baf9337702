"""Move queued tasks from core.zeromq (aiida-core 2.9's own ZeroMQ broker) into this broker's store, and back.

There is no broker to confirm anything: both sides are on disk, core.zeromq's files (:mod:`aiida_zmq.core_zeromq`)
and this broker's store, and a move is a sequence of durable steps with a journal (:class:`MoveJournal`) in the
store's database, committed with the tasks themselves. See :func:`import_from_core_zeromq` and
:func:`export_to_core_zeromq`; moves to and from RabbitMQ are in :mod:`aiida_zmq.migrate`.

No AiiDA import here: the CLI (:mod:`aiida_zmq.cli.aiida`) maps a profile to core.zeromq's directory, its launch queue
and AiiDA's codec, and passes them in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import typing as t
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .core_zeromq import CoreZeromqDir, CoreZeromqRunning, TaskFile
from .exceptions import MoveStopped, StoreError
from .store import (
    DEAD,
    STORE_FILENAME,
    MoveEntry,
    TaskStore,
    broker_lock,
    ensure_private_dir,
    open_offline,
    peek_moves,
)

__all__ = (
    'INTO_STORE',
    'OUT_OF_STORE',
    'CoreZeromqMove',
    'MoveJournal',
    'export_to_core_zeromq',
    'import_from_core_zeromq',
)

LOGGER = logging.getLogger(__name__)

INTO_STORE = 'in'  # core.zeromq -> this broker's store
OUT_OF_STORE = 'out'  # this broker's store -> core.zeromq
# States of a journal entry. In: COPIED (the row is committed, the source file may still be in core.zeromq's sight),
# MOVED (the source file is retired), RETURNED (core.zeromq's broker took the task back: our copy was withdrawn).
# Out: MOVED (the file is written and the row deleted).
COPIED = 'copied'
MOVED = 'moved'
RETURNED = 'returned'
BATCH_SIZE = 500

# The core.zeromq task id of a task written by :func:`export_to_core_zeromq`: the store it came from (an id the
# journal draws once) and its row there (row ids are never reused within a store), so that a rerun can tell its own
# files, and the row each came from, from the files of any other store.
_EXPORT_ID = re.compile(r'^aiida-zmq-([0-9a-f]{12})-(\d+)$')

Event = Callable[[str, str], None]


class MoveJournal:
    """The store of a stopped broker, with the journal of the moves from and to core.zeromq in the same database.

    One table beside the broker's ``tasks``, which the broker ignores (its schema is the store's:
    :meth:`TaskStore.open_move_journal`): per direction and core.zeromq task id, the row here and how far the move got.
    It is written in the store's own transactions, so a copied task and the entry that says so are committed together
    or not at all: that is how a rerun tells a task moved before a crash from one that was not. Entries are kept (a
    few dozen bytes per task): a task moved once is never copied again. Commits are synced (``fsync``): a source is
    deleted after them, so they must outlast a power cut as well as a crash.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.store = open_offline(path)  # synced (the default), its identity record kept as the broker keeps it
        self.store_id: str = self.store.open_move_journal()

    def entries(self, direction: str) -> dict[str, MoveEntry]:
        return self.store.moves(direction)

    def record(self, direction: str, zeromq_id: str, task_id: int, state: str) -> None:
        """Add or update an entry in the open batch."""
        self.store.record_move(direction, zeromq_id, task_id, state)

    @staticmethod
    def peek(path: str | os.PathLike[str], direction: str) -> tuple[str | None, dict[str, MoveEntry]]:
        """The store id and the entries, read-only (a dry run): nothing when there is no store or journal yet."""
        return peek_moves(path, direction)


@dataclass
class CoreZeromqMove:
    """What a move from or to core.zeromq did; for a dry run, what it would do."""

    direction: str
    dry_run: bool = False
    moved: int = 0  # tasks moved by this run
    pending: int = 0  # of which were waiting in core.zeromq (in) / in the store (out)
    processing: int = 0  # of which a worker held when the broker stopped: they are handed out again
    finished: int = 0  # tasks an interrupted run had copied, whose move this run finished
    withdrawn: int = 0  # copies taken back: the other side ran the task after an interrupted move
    left: list[str] = field(default_factory=list)  # what stays where it is, and why

    def as_dict(self) -> dict[str, t.Any]:
        return {
            'direction': self.direction,
            'dry_run': self.dry_run,
            'moved': self.moved,
            'pending': self.pending,
            'processing': self.processing,
            'finished': self.finished,
            'withdrawn': self.withdrawn,
            'left': list(self.left),
        }


def _notify(on_event: Event | None, event: str, zeromq_id: str) -> None:
    if on_event is not None:
        on_event(event, zeromq_id)


def import_from_core_zeromq(
    source: CoreZeromqDir,
    data_dir: str | os.PathLike[str],
    queue: str,
    encoder: Callable[[t.Any], bytes],
    *,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    on_event: Event | None = None,
) -> CoreZeromqMove:
    """Move every task of a stopped core.zeromq into ``queue`` of the store in ``data_dir`` (its broker stopped too).

    Both brokers stopped, nothing else writes to either side. Per batch of tasks, in core.zeromq's order:

    1. copy: each task's ``body``, encoded with ``encoder`` (the profile's codec), becomes a row of ``queue``, and its
       journal entry (core.zeromq id -> row, ``copied``) goes into the same transaction; commit;
    2. retire: each source file is renamed out of core.zeromq's sight (``moved-to-aiida-zmq/``); sync;
    3. finish: the entries become ``moved``; commit; the retired files are deleted.

    A task is in core.zeromq's queue until its step 2 and in the store from its step 1: on at least one side at every
    moment, on both only in between. A rerun first settles each ``copied`` entry an interrupted run left: its file still
    in ``pending/`` or ``processing/`` -> retire and finish it; in ``moved-to-aiida-zmq/`` -> finish it; nowhere ->
    core.zeromq's broker ran in between and took the task, so the copy is withdrawn (deleted, if still waiting). A task
    whose entry says ``moved`` is never copied again. Then it moves the rest.

    ``on_event(event, zeromq_id)`` is called after each durable step: ``copied``, ``retired``, ``moved``, ``withdrawn``.

    :raises CoreZeromqRunning: core.zeromq's broker runs (not checked for a dry run): checked first, and noticed during
        the move when a file it took disappears (the copy of that task is withdrawn and the move stops; rerun it with
        the broker stopped).
    :raises BrokerRunning: a broker of this project holds ``data_dir``.
    """
    report = CoreZeromqMove(INTO_STORE, dry_run=dry_run)
    if dry_run:  # changes nothing, so it need not wait for anything to stop (the CLI says what would refuse)
        return _plan_import(source, Path(data_dir), report)
    source.refuse_if_running()
    directory = ensure_private_dir(data_dir)
    with broker_lock(directory, blocking=False):
        journal = MoveJournal(directory / STORE_FILENAME)
        try:
            with _stops_saying_what_moved(report, lambda: f'{len(source.task_files())} still in {source.tasks_dir}'):
                _settle_import(journal, source, report, on_event)
                _import_files(journal, source, queue, encoder, report, batch_size, on_event)
            source.tidy()
        except BaseException:
            # Ctrl-C or an error inside a batch: ``close()`` would commit it, maybe a row without its journal entry.
            journal.store.rollback()
            raise
        finally:
            journal.store.close()
        os.chmod(directory / STORE_FILENAME, 0o600)
    LOGGER.info('moved %d task(s) from %s into %s', report.moved, source.service_dir, queue)
    return report


def _plan_import(source: CoreZeromqDir, data_dir: Path, report: CoreZeromqMove) -> CoreZeromqMove:
    _, entries = MoveJournal.peek(data_dir / STORE_FILENAME, INTO_STORE)
    for task_file in source.task_files():
        entry = entries.get(task_file.task_id)
        if entry is not None and entry.state == COPIED:
            report.finished += 1
        elif entry is not None and entry.state == MOVED:
            report.left.append(f'{task_file.path}: moved before (task {entry.task_id} of the store); not copied again')
        else:
            report.moved += 1
            report.pending += task_file.state == 'pending'
            report.processing += task_file.state == 'processing'
    report.left.extend(_foreign(source))
    return report


def _foreign(source: CoreZeromqDir) -> list[str]:
    return [
        f'{path}: not a task file core.zeromq reads (a `.tmp` is a write its broker never finished); left as it is'
        for path in source.foreign_files()
    ]


def _withdraw(journal: MoveJournal, task_id: int) -> bool:
    """Delete our copy if it is still waiting (nobody ran it here); whether it was."""
    stored = journal.store.load_tasks([task_id])
    if stored and stored[0].state != DEAD and stored[0].attempts == 0:
        journal.store.delete([task_id])
        return True
    return False


def _settle_import(journal: MoveJournal, source: CoreZeromqDir, report: CoreZeromqMove, on_event: Event | None) -> None:
    """Finish the moves an interrupted run started (see :func:`import_from_core_zeromq`)."""
    entries = journal.entries(INTO_STORE)
    retired = source.retired_files()
    copied = {zeromq_id: entry for zeromq_id, entry in entries.items() if entry.state == COPIED}
    if copied:
        index = source.index()
        to_finish: list[tuple[str, int, Path]] = []
        for zeromq_id, entry in copied.items():
            if zeromq_id in index:
                to_finish.append((zeromq_id, entry.task_id, source.retire(index[zeromq_id])))
                _notify(on_event, 'retired', zeromq_id)
            elif zeromq_id in retired:
                to_finish.append((zeromq_id, entry.task_id, retired.pop(zeromq_id)))
            else:
                # Neither in core.zeromq's queue nor retired by us: its broker ran after our copy and took the task.
                if not _withdraw(journal, entry.task_id):
                    report.left.append(
                        f'task {zeromq_id}: core.zeromq took it back after it was copied, and the copy (task '
                        f'{entry.task_id}) was delivered here too; check its process'
                    )
                journal.record(INTO_STORE, zeromq_id, entry.task_id, RETURNED)
                journal.store.commit()
                report.withdrawn += 1
                _notify(on_event, 'withdrawn', zeromq_id)
        _finish_import(journal, source, to_finish, on_event)
        report.finished += len(to_finish)
    # Retired files of finished moves: the run was interrupted between the commit and their deletion.
    for zeromq_id, path in retired.items():
        known = entries.get(zeromq_id)
        if known is not None and known.state in (MOVED, COPIED):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            report.left.append(f'{path}: retired, but the store has no record of it; left as it is')


def _finish_import(
    journal: MoveJournal, source: CoreZeromqDir, retired: list[tuple[str, int, Path]], on_event: Event | None
) -> None:
    if not retired:
        return
    source.sync()
    for zeromq_id, task_id, _ in retired:
        journal.record(INTO_STORE, zeromq_id, task_id, MOVED)
    journal.store.commit()
    for zeromq_id, _, path in retired:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _notify(on_event, 'moved', zeromq_id)


def _import_files(
    journal: MoveJournal,
    source: CoreZeromqDir,
    queue: str,
    encoder: Callable[[t.Any], bytes],
    report: CoreZeromqMove,
    batch_size: int,
    on_event: Event | None,
) -> None:
    entries = journal.entries(INTO_STORE)
    batch: list[TaskFile] = []
    for task_file in source.task_files():
        entry = entries.get(task_file.task_id)
        if entry is not None and entry.state in (MOVED, COPIED):
            report.left.append(f'{task_file.path}: moved before (task {entry.task_id} of the store); not copied again')
            continue
        batch.append(task_file)
        if len(batch) >= batch_size:
            _import_batch(journal, source, queue, encoder, batch, report, on_event)
            batch = []
    _import_batch(journal, source, queue, encoder, batch, report, on_event)
    report.left.extend(_foreign(source))


def _import_batch(
    journal: MoveJournal,
    source: CoreZeromqDir,
    queue: str,
    encoder: Callable[[t.Any], bytes],
    batch: list[TaskFile],
    report: CoreZeromqMove,
    on_event: Event | None,
) -> None:
    copies: list[tuple[TaskFile, int]] = []
    for task_file in batch:
        try:
            body = source.read(task_file)['body']
        except FileNotFoundError:
            journal.store.rollback()
            raise CoreZeromqRunning(
                f'{task_file.path} disappeared during the move: the core.zeromq broker of {source.service_dir} runs. '
                f'Stop the daemon (`{source.stop_daemon}`) and run the same command again'
            ) from None
        except ValueError as exception:
            report.left.append(f'{task_file.path}: unreadable ({exception}); left as it is')
            continue
        task_id = journal.store.insert(queue, encoder(body), True, None, None)
        journal.record(INTO_STORE, task_file.task_id, task_id, COPIED)
        copies.append((task_file, task_id))
    if not copies:
        return
    journal.store.commit()  # step 1: the copies are durable before any source file is touched
    for task_file, _ in copies:
        _notify(on_event, 'copied', task_file.task_id)
    retired: list[tuple[str, int, Path]] = []
    for task_file, task_id in copies:
        try:
            retired.append((task_file.task_id, task_id, source.retire(task_file)))
        except FileNotFoundError:
            # core.zeromq's broker started and took the file (renamed it to processing/, or back to pending/): the task
            # is in its hands now. Withdraw our copy, keep what was moved, stop.
            _withdraw(journal, task_id)
            journal.record(INTO_STORE, task_file.task_id, task_id, RETURNED)
            _finish_import(journal, source, retired, on_event)
            journal.store.commit()
            report.moved += len(retired)
            raise CoreZeromqRunning(
                f'the core.zeromq broker of {source.service_dir} started during the move and took {task_file.name}; '
                f'{report.moved} task(s) were moved. Stop the daemon (`{source.stop_daemon}`) and run the same '
                'command again to move the rest'
            ) from None
        _notify(on_event, 'retired', task_file.task_id)
        report.pending += task_file.state == 'pending'
        report.processing += task_file.state == 'processing'
    _finish_import(journal, source, retired, on_event)
    report.moved += len(retired)


def export_to_core_zeromq(
    data_dir: str | os.PathLike[str],
    target: CoreZeromqDir,
    queue: str,
    decoder: Callable[[bytes], t.Any],
    *,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    on_event: Event | None = None,
) -> CoreZeromqMove:
    """Move the tasks of ``queue`` in the store of ``data_dir`` (waiting, and held when the broker stopped: both would
    run) into core.zeromq's ``pending/``, where its broker runs them. Both brokers stopped. Per batch, oldest first:

    1. write: each task becomes ``pending/<created us>_aiida-zmq-<store id>-<row>.json``, as core.zeromq writes one
       (complete and synced under a temporary name, then renamed in); the directory is synced;
    2. forget: the rows are deleted and recorded as ``moved`` in the journal, in one transaction; commit.

    A task is in the store until its step 2 and in core.zeromq's queue from its step 1: on both only in between. The
    file name says which store and row a task came from, so a rerun first settles every file of this store without a
    journal entry: its row still there -> step 2 was not done, it is done now; its row gone -> this broker ran the task
    after the interrupted move (the daemon was started before the rerun), and the file, ours, is a duplicate: it is
    deleted. Files written from another store are core.zeromq's tasks like any other.

    Tasks of other queues and dead letters stay in the store (core.zeromq has one queue and no dead letters), and so
    does a task whose body is not JSON (core.zeromq carries JSON only): ``left`` says so.
    ``on_event(event, zeromq_id)``: ``written`` (step 1 of a task), ``moved`` (its step 2), ``withdrawn``.

    :raises CoreZeromqRunning: core.zeromq's broker runs (not for a dry run).
    :raises BrokerRunning: a broker of this project holds ``data_dir``.
    """
    report = CoreZeromqMove(OUT_OF_STORE, dry_run=dry_run)
    if not dry_run:
        target.refuse_if_running()
    path = Path(data_dir) / STORE_FILENAME
    if not path.exists():
        report.left.append(f'there is no task store in {data_dir}: nothing to move')
        return report
    with broker_lock(data_dir, blocking=False):
        if dry_run:
            return _plan_export(path, target, queue, report)
        journal = MoveJournal(path)
        try:
            _settle_export(journal, target, report, on_event)
            waiting = _waiting_tasks(journal.store, queue)
            with _stops_saying_what_moved(report, lambda: f'{len(waiting) - report.moved} still in the store'):
                for start in range(0, len(waiting), batch_size):
                    _export_batch(journal, target, waiting[start : start + batch_size], decoder, report, on_event)
            _left_in_store(journal.store, queue, report)
        except BaseException:
            journal.store.rollback()  # as above: a row deleted without its journal entry reads as run here
            raise
        finally:
            journal.store.close()
    LOGGER.info('moved %d task(s) of %s to %s', report.moved, queue, target.service_dir)
    return report


def _plan_export(path: Path, target: CoreZeromqDir, queue: str, report: CoreZeromqMove) -> CoreZeromqMove:
    store_id, entries = MoveJournal.peek(path, OUT_OF_STORE)
    report.finished = sum(1 for zeromq_id in target.index() if _own_export(zeromq_id, store_id, entries) is not None)
    task_store = TaskStore(path)
    try:
        waiting = _waiting_tasks(task_store, queue)
        _left_in_store(task_store, queue, report)
    finally:
        task_store.close()
    report.moved = len(waiting)
    report.pending = sum(state == 'ready' for _, _, state in waiting)
    report.processing = report.moved - report.pending
    return report


def export_id(store_id: str, task_id: int) -> str:
    """The core.zeromq task id of task ``task_id`` of the store ``store_id``, written for core.zeromq."""
    return f'aiida-zmq-{store_id}-{task_id}'


def _own_export(zeromq_id: str, store_id: str | None, entries: dict[str, MoveEntry]) -> int | None:
    """The row a file written by this store came from, if the journal does not say yet that it was moved."""
    match = _EXPORT_ID.match(zeromq_id)
    if match is None or match.group(1) != store_id or zeromq_id in entries:
        return None
    return int(match.group(2))


def _waiting_tasks(task_store: TaskStore, queue: str) -> list[tuple[int, float, str]]:
    """(row id, created, state) of the tasks of ``queue`` that would run: waiting, or held when the broker stopped."""
    rows = task_store.list_tasks(queue, limit=2**62)
    return [(row['id'], row['created'], row['state']) for row in rows if row['state'] in ('ready', 'delivered')]


def _settle_export(journal: MoveJournal, target: CoreZeromqDir, report: CoreZeromqMove, on_event: Event | None) -> None:
    """Finish or undo what an interrupted run left (see :func:`export_to_core_zeromq`)."""
    target.remove_temporary_files()  # ours, never renamed in: core.zeromq never saw them
    entries = journal.entries(OUT_OF_STORE)
    unsettled = {
        zeromq_id: (task_id, task_file)
        for zeromq_id, task_file in target.index().items()
        if (task_id := _own_export(zeromq_id, journal.store_id, entries)) is not None
    }
    if not unsettled:
        return
    rows = journal.store.load_tasks(task_id for task_id, _ in unsettled.values())
    present = {task.id for task in rows if task.state != DEAD}
    for zeromq_id, (task_id, task_file) in unsettled.items():
        if task_id in present:
            journal.store.delete([task_id])
            journal.record(OUT_OF_STORE, zeromq_id, task_id, MOVED)
            report.finished += 1
            _notify(on_event, 'moved', zeromq_id)
        else:
            with contextlib.suppress(FileNotFoundError):
                task_file.path.unlink()
            report.withdrawn += 1
            _notify(on_event, 'withdrawn', zeromq_id)
    target.sync()
    journal.store.commit()


def _export_batch(
    journal: MoveJournal,
    target: CoreZeromqDir,
    batch: list[tuple[int, float, str]],
    decoder: Callable[[bytes], t.Any],
    report: CoreZeromqMove,
    on_event: Event | None,
) -> None:
    created = {task_id: when for task_id, when, _ in batch}
    states = {task_id: state for task_id, _, state in batch}
    written: list[tuple[int, str]] = []
    stopped: OSError | None = None
    for task in journal.store.load_tasks(created):
        zeromq_id = export_id(journal.store_id, task.id)
        try:
            body = decoder(task.payload)
            target.write_pending(zeromq_id, body, created[task.id])
        except OSError as exception:  # the disk is full (or failing): finish what was written whole, then stop
            stopped = exception
            break
        except Exception as exception:  # a body core.zeromq cannot carry, or one that does not decode
            report.left.append(f'task {task.id}: cannot be written for core.zeromq ({exception}); left in the store')
            continue
        written.append((task.id, zeromq_id))
        _notify(on_event, 'written', zeromq_id)
    if written:
        _forget_exported(journal, target, written, states, report, on_event)
    if stopped is not None:
        raise stopped


def _forget_exported(
    journal: MoveJournal,
    target: CoreZeromqDir,
    written: list[tuple[int, str]],
    states: dict[int, str],
    report: CoreZeromqMove,
    on_event: Event | None,
) -> None:
    """Step 2 of the tasks whose files are written whole: the files and their names synced, then the rows go."""
    target.sync()  # step 1 durable before the rows go
    journal.store.delete([task_id for task_id, _ in written])
    for task_id, zeromq_id in written:
        journal.record(OUT_OF_STORE, zeromq_id, task_id, MOVED)
    journal.store.commit()
    for task_id, zeromq_id in written:
        report.moved += 1
        report.pending += states[task_id] == 'ready'
        report.processing += states[task_id] != 'ready'
        _notify(on_event, 'moved', zeromq_id)


@contextlib.contextmanager
def _stops_saying_what_moved(report: CoreZeromqMove, left: Callable[[], str]) -> Iterator[None]:
    """A full (or failing) disk in the middle of a move: what was moved stays moved (each task once), the rest where
    it was (``left()`` says how many, and where); the error says both, never that nothing was moved."""
    try:
        yield
    except (OSError, StoreError) as exception:
        if isinstance(exception, MoveStopped):
            raise
        raise MoveStopped(
            f'{exception}. The move stopped there: {report.moved} task(s) moved, each once, {left()}, where they '
            'were. Free space (`df -h`), then run the same command again to move the rest',
            report.moved,
        ) from exception


def _left_in_store(task_store: TaskStore, queue: str, report: CoreZeromqMove) -> None:
    others = {name: count for name, count in task_store.ready_counts().items() if name != queue}
    if others:
        listed = ', '.join(f'{name} ({count})' for name, count in sorted(others.items()))
        report.left.append(f'tasks of other queues stay in the store (core.zeromq has one queue): {listed}')
    dead = len(task_store.dead_letters(queue))
    if dead:
        report.left.append(
            f'{dead} dead-lettered task(s) stay in the store (`aiida-zmq dead-letter list` shows them, with the broker '
            'running)'
        )
