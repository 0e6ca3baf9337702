"""The broker's task queues: per queue, a FIFO window of ready tasks in memory, the rest on disk.

A queue's tasks live in the store; what is kept in memory is bounded (``window`` tasks, ``window_bytes`` bytes per
queue), and the rest is counted (``backlog``) and read back in pages, in id order, as the window empties.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from .store import StoredTask, TaskStore

if TYPE_CHECKING:
    from .server import BrokerConfig, Client

__all__ = ('QueueState',)


class QueueState:
    """One named task queue: a FIFO window of ready tasks in memory, the rest (``backlog``) on disk."""

    def __init__(self, name: str, backlog: int = 0) -> None:
        self.name = name
        self.ready: collections.deque[StoredTask] = collections.deque()
        self.ready_bytes = 0
        self.backlog = backlog  # ready tasks in the store with an id above ``cursor``, not in memory
        self.cursor = 0  # highest id that was ever in the window
        self.consumers: list[Client] = []
        self.next_consumer = 0

    def __len__(self) -> int:
        return len(self.ready) + self.backlog

    def add_new(self, task: StoredTask, config: BrokerConfig) -> None:
        if self.backlog == 0 and len(self.ready) < config.window and self.ready_bytes < config.window_bytes:
            self.ready.append(task)
            self.ready_bytes += len(task.payload)
            self.cursor = task.id
        else:
            self.backlog += 1

    def put_back(self, task: StoredTask) -> None:
        """A task that was handed out comes back: it goes to the front, ahead of newer tasks."""
        self.ready.appendleft(task)
        self.ready_bytes += len(task.payload)

    def pop(self, store: TaskStore, config: BrokerConfig) -> StoredTask | None:
        if not self.ready and self.backlog:
            page = store.load_ready(self.name, self.cursor, max(1, config.window // 2))
            for task in page:
                self.ready.append(task)
                self.ready_bytes += len(task.payload)
            if page:
                self.cursor = page[-1].id
            self.backlog = 0 if len(page) < max(1, config.window // 2) else max(0, self.backlog - len(page))
        if not self.ready:
            return None
        task = self.ready.popleft()
        self.ready_bytes -= len(task.payload)
        return task
