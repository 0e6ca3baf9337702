"""Repair with the daemon running (``aiida-zmq repair``): revive the active processes that have no task, and never make
a second task for a process whose task waits, backs off or is held by a worker.

``verdi process repair`` wants the daemon stopped, and with reason: it reads the active processes, then the tasks it
can take from the queue; a task a worker holds is not among those, so its process looks like a zombie and is revived
a second time (aiida-core #5715, #3973), and a task stored between its two reads looks like one of a terminated
process and is acknowledged (gone). Here:

1. the active processes are read first, then the broker's tasks in one snapshot (the ADMIN ``tasks`` listing, taken
   on the broker's loop between two messages: waiting, held and backing-off tasks alike, with the process each is
   for); a process submitted after the first read is not looked at, and no task can slip between two reads;
2. a process created less than ``min_age`` seconds ago is left alone: ``submit()`` stores the node before it sends
   the task, and may be between the two;
3. just before each revival, the broker is asked again about that one process (``task-info``), and the process must
   still be active in the database;
4. tasks of processes that are no longer active are not touched: the worker given one drops it;
5. one repair at a time per profile (a lock file beside the broker's store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ('RepairReport', 'repair')

LOCK_FILENAME = 'repair.lock'


@dataclasses.dataclass
class RepairReport:
    active: list[int]
    with_task: list[int]
    revived: list[int] = dataclasses.field(default_factory=list)
    too_young: list[int] = dataclasses.field(default_factory=list)  # no task, but created less than min_age ago
    gained_task: list[int] = dataclasses.field(default_factory=list)  # got one between the snapshot and the revival
    ended: list[int] = dataclasses.field(default_factory=list)  # terminated between the snapshot and the revival
    tasks_of_inactive: list[int] = dataclasses.field(default_factory=list)  # left for the worker given them to drop
    duplicated: dict[int, int] = dataclasses.field(default_factory=dict)  # pk -> live tasks, when more than one


@contextlib.contextmanager
def _one_repair(data_dir: Path) -> Iterator[None]:
    from aiida_zmq.exceptions import BrokerRunning

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrokerRunning(f'another `aiida-zmq repair` runs on {data_dir}: wait for it') from None
        yield
    finally:
        os.close(fd)


def _active(min_age: float) -> tuple[list[int], set[int]]:
    """The active processes (created, waiting, running), and those among them created ``min_age`` seconds ago or
    less (by the database's clock, as stored)."""
    from aiida import orm

    filters = {'attributes.process_state': {'in': ['created', 'waiting', 'running']}}
    rows = orm.QueryBuilder().append(orm.ProcessNode, filters=filters, project=['id', 'ctime']).all()
    now = time.time()
    return sorted(pk for pk, _ in rows), {pk for pk, ctime in rows if now - ctime.timestamp() < min_age}


def _still_active(pk: int) -> bool:
    from aiida import orm

    from .queries import TERMINAL_STATES

    node = orm.load_node(pk)
    return node.process_state is not None and node.process_state.value not in TERMINAL_STATES


def repair(
    data_dir: Path,
    snapshot: Callable[[], list[dict[str, t.Any]]],
    live_tasks_of: Callable[[int], int],
    revive: Callable[[int], None],
    *,
    dry_run: bool = False,
    min_age: float = 30.0,
) -> RepairReport:
    """Revive the zombies (module docstring). ``snapshot``: the broker's task rows (``tasks``); ``live_tasks_of``: how
    many waiting or held tasks the broker has for one process now; ``revive``: send a process its continue task."""
    with _one_repair(data_dir):
        active, young = _active(min_age)
        rows = [row for row in snapshot() if row.get('process') is not None and row['state'] in ('ready', 'delivered')]
        counts: dict[int, int] = {}
        for row in rows:
            counts[row['process']] = counts.get(row['process'], 0) + 1
        report = RepairReport(active=active, with_task=sorted(set(active) & set(counts)))
        report.duplicated = {pk: count for pk, count in sorted(counts.items()) if count > 1}
        report.tasks_of_inactive = sorted(set(counts) - set(active))
        for pk in sorted(set(active) - set(counts)):
            if pk in young:
                report.too_young.append(pk)
            elif live_tasks_of(pk):
                report.gained_task.append(pk)
            elif not _still_active(pk):
                report.ended.append(pk)
            else:
                if not dry_run:
                    revive(pk)
                report.revived.append(pk)
        return report
