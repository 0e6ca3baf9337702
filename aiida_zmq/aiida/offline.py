"""A profile's task queue read straight from its broker's store, while no broker runs (``verdi process repair``).

:class:`aiida_zmq.aiida.communicator.ProfileCommunicator` uses it offline. Every read happens under the broker's
lock, so a broker that starts meanwhile waits for it (and a running broker makes it raise :class:`BrokerRunning`:
go through the broker then).
"""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import kiwipy

from aiida_zmq import store
from aiida_zmq.exceptions import BrokerNotRunning

__all__ = ('BrokerNotRunning', 'OfflineTask', 'OfflineTaskQueue')

Decoder = Callable[[bytes], t.Any]


class OfflineTaskQueue:
    """The stored tasks of one queue of a broker that is not running."""

    def __init__(self, data_dir: str, name: str, decoder: Decoder) -> None:
        self._data_dir = Path(data_dir)
        self.name = name
        self._decoder = decoder

    def __iter__(self) -> Iterator[OfflineTask]:
        """Go through the stored tasks of this queue, oldest first, holding the broker's lock meanwhile.

        Tasks waiting to be delivered and tasks that were handed out when the broker last stopped (it hands those out
        again when it starts) both count: both will run. A task whose ``processing()`` outcome is set is deleted, as
        an acknowledged task is. A broker that never ran has no store: no tasks, and nothing is created.

        :raises aiida_zmq.exceptions.BrokerRunning: when a broker runs (go through it instead).
        """
        with self._store() as task_store:
            if task_store is None:
                return
            for task in self._load(task_store):
                offline_task = OfflineTask(task.id, task.payload, self._decoder)
                yield offline_task
                self._finish(task_store, offline_task)

    @contextlib.contextmanager
    def next_task(self) -> Iterator[OfflineTask]:
        """The oldest stored task; processed inside the block (outcome set), it is deleted.

        :raises kiwipy.QueueEmpty: when the queue has no stored task.
        """
        with self._store() as task_store:
            stored = self._load(task_store) if task_store is not None else []
            if not stored:
                raise kiwipy.QueueEmpty(f"the queue '{self.name}' has no stored task")
            task = OfflineTask(stored[0].id, stored[0].payload, self._decoder)
            yield task
            assert task_store is not None
            self._finish(task_store, task)

    @contextlib.contextmanager
    def _store(self) -> Iterator[store.TaskStore | None]:
        """The store under the broker's lock; ``None`` when there is none (the broker never ran)."""
        path = self._data_dir / store.STORE_FILENAME
        if not path.exists():
            yield None
            return
        with store.broker_lock(self._data_dir, blocking=False):
            task_store = store.TaskStore(path)
            try:
                yield task_store
            finally:
                task_store.close()

    def _load(self, task_store: store.TaskStore) -> list[store.StoredTask]:
        stored = [task for task in task_store.load_delivered() if task.queue == self.name]
        after = 0
        while True:
            batch = task_store.load_ready(self.name, after, 1000)
            if not batch:
                break
            stored.extend(batch)
            after = batch[-1].id
        return sorted(stored, key=lambda task: task.id)

    @staticmethod
    def _finish(task_store: store.TaskStore, task: OfflineTask) -> None:
        if task.acknowledged:
            task_store.delete([task.task_id])
            task_store.commit()


class OfflineTask:
    """A stored task seen while its broker is not running."""

    def __init__(self, task_id: int, payload: bytes, decoder: Decoder) -> None:
        self.task_id = task_id
        self._payload = payload
        self._decoder = decoder
        self.acknowledged = False
        self.no_reply = True

    @property
    def body(self) -> t.Any:
        return self._decoder(self._payload)

    @contextlib.contextmanager
    def processing(self) -> Iterator[kiwipy.Future]:
        """Process the task inside the block: when its outcome is set, the task is removed from the store."""
        outcome: kiwipy.Future = kiwipy.Future()
        try:
            yield outcome
        except Exception as exception:
            if not outcome.done():
                outcome.set_exception(exception)
            raise
        finally:
            self.acknowledged = outcome.done() and not outcome.cancelled()
