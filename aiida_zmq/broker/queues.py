"""The broker's task queues: which exist, what each holds in memory, and which may have a delivery to make.

A queue's tasks live in the store; what is kept in memory is bounded (``window`` tasks, ``window_bytes`` bytes per
queue), and the rest is counted (``backlog``) and read back in pages, in id order, as the window empties. The rule
that keeps memory and store apart: a ready row with an id above the queue's ``cursor`` is never in memory, one at or
below it always is (or is held, or backing off). A task that comes back goes to the front of the window if its id is
at or below the cursor, else it is counted in the backlog and read again in its turn.

Queues cost memory whether or not they hold tasks, and any client can name one, so their number is bounded, per
client (``max_queues_per_client`` consumed at once) and in all (``max_queues``). A queue that holds nothing and that
nobody consumes is idle: it is forgotten after ``queue_expiry`` seconds (RabbitMQ's ``x-expires``), or at once when a
new queue needs its place under ``max_queues``. A turn of the broker's loop hands out tasks only for the queues where
something changed (a task arrived or came back, a consumer came or got room): with 10,000 idle queues a turn costs
what it costs with one.
"""

from __future__ import annotations

import collections
import typing as t
from collections.abc import Callable, Iterator

from ..store import StoredTask, TaskStore
from .config import BrokerConfig

__all__ = ('Consumer', 'QueueState', 'TaskQueues')


class Consumer(t.Protocol):
    """A client as a queue sees it (:class:`aiida_zmq.broker.peers.Client`)."""

    @property
    def stalled(self) -> bool:
        """Messages wait for it: it gets no deliveries now."""

    def room(self, queue: str) -> int:
        """How many more tasks of ``queue`` its prefetch lets it take."""


C = t.TypeVar('C', bound=Consumer)


class QueueState:
    """One named task queue: a FIFO window of ready tasks in memory, the rest (``backlog``) on disk."""

    def __init__(self, name: str, backlog: int = 0) -> None:
        self.name = name
        self.ready: collections.deque[StoredTask] = collections.deque()
        self.ready_bytes = 0
        self.backlog = backlog  # ready tasks in the store with an id above ``cursor``, not in memory
        self.cursor = 0  # highest id that was ever in the window
        self.consumers: list[Consumer] = []
        self.next_consumer = 0

    def __len__(self) -> int:
        return len(self.ready) + self.backlog

    @property
    def idle(self) -> bool:
        """Holds nothing and nobody consumes it: it can be forgotten (it is made again when it is named)."""
        return not self.consumers and not self.ready and not self.backlog

    def add_new(self, task: StoredTask, config: BrokerConfig) -> bool:
        """A task just stored; returns whether it went into the window (else it waits on disk)."""
        if self.backlog == 0 and len(self.ready) < config.window and self.ready_bytes < config.window_bytes:
            self.ready.append(task)
            self.ready_bytes += len(task.payload)
            self.cursor = task.id
            return True
        self.backlog += 1
        return False

    def put_back(self, task: StoredTask) -> None:
        """A task that was handed out comes back (its store row ready again): ahead of newer tasks."""
        if task.id > self.cursor:
            self.backlog += 1  # never in this window (a task from before a restart): read again in id order
            return
        self.ready.appendleft(task)
        self.ready_bytes += len(task.payload)

    def remove(self, task_ids: set[int]) -> int:
        """Take these tasks out of the window (a batch that did not commit); returns how many were there."""
        kept = collections.deque(task for task in self.ready if task.id not in task_ids)
        removed = len(self.ready) - len(kept)
        if removed:
            self.ready = kept
            self.ready_bytes = sum(len(task.payload) for task in kept)
        return removed

    def clear(self) -> None:
        self.ready.clear()
        self.ready_bytes = 0
        self.backlog = 0

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


class TaskQueues:
    """The broker's named queues, bounded in number, and the set of those that may have a delivery to make."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self._by_name: dict[str, QueueState] = {}
        self._woken: dict[str, None] = {}  # an ordered set: queues to look at in the next dispatch
        self._idle: dict[str, float] = {}  # idle queues, oldest first, with the time they became idle

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> QueueState:
        return self._by_name[name]

    def __setitem__(self, name: str, queue: QueueState) -> None:
        """A queue loaded from the store at start (unbounded: its tasks are there)."""
        self._by_name[name] = queue

    def get(self, name: str) -> QueueState | None:
        return self._by_name.get(name)

    def values(self) -> Iterator[QueueState]:
        return iter(self._by_name.values())

    def items(self) -> Iterator[tuple[str, QueueState]]:
        return iter(self._by_name.items())

    def open(self, name: str, *, bounded: bool = True, backlog: int = 0) -> QueueState | None:
        """The queue ``name``, made if it does not exist. A client naming a new queue (``bounded``) gets None when
        the broker holds ``max_queues`` already; tasks coming back always get their queue."""
        queue = self._by_name.get(name)
        if queue is None:
            if bounded and len(self._by_name) >= self.config.max_queues and not self._evict_idle():
                return None
            queue = self._by_name[name] = QueueState(name, backlog)
        return queue

    def _evict_idle(self) -> bool:
        """Forget the queue idle the longest (or one that turned idle in this turn); returns whether there was one."""
        while self._idle:
            name = next(iter(self._idle))
            del self._idle[name]
            queue = self._by_name.get(name)
            if queue is not None and queue.idle:
                del self._by_name[name]
                return True
        for name in self._woken:
            queue = self._by_name.get(name)
            if queue is not None and queue.idle:
                del self._by_name[name]
                return True
        return False

    def wake(self, name: str) -> None:
        """Something changed in this queue (a task, a consumer, room): look at it in the next dispatch."""
        self._woken[name] = None

    def take_woken(self, now: float) -> list[QueueState]:
        """The queues woken since the last call that may have something to hand out; those that turned idle start
        their expiry."""
        names, self._woken = self._woken, {}
        woken = []
        for name in names:
            queue = self._by_name.get(name)
            if queue is None:
                continue
            if queue.idle:
                self._idle.setdefault(name, now)
                continue
            self._idle.pop(name, None)
            woken.append(queue)
        return woken

    def expire(self, now: float) -> int:
        """Forget the queues idle for ``queue_expiry`` seconds; returns how many."""
        deadline = now - self.config.queue_expiry
        forgotten = 0
        while self._idle:
            name, since = next(iter(self._idle.items()))
            if since > deadline:
                break
            del self._idle[name]
            queue = self._by_name.get(name)
            if queue is not None and queue.idle:
                del self._by_name[name]
                forgotten += 1
        return forgotten

    def forget_new(self, tasks: t.Iterable[StoredTask]) -> None:
        """Take new tasks whose batch did not commit (refused to their senders) out of their queues' windows, and
        look at every queue with consumers again (a dispatch cut short by the failure left some unlooked at)."""
        by_queue: dict[str, set[int]] = {}
        for task in tasks:
            by_queue.setdefault(task.queue, set()).add(task.id)
        for name, waiting in by_queue.items():
            queue = self._by_name.get(name)
            if queue is not None:
                queue.backlog = max(0, queue.backlog - (len(waiting) - queue.remove(waiting)))
                self.wake(name)
        for queue in self._by_name.values():
            if queue.consumers and len(queue):
                self.wake(queue.name)

    # Dispatch -----------------------------------------------------------------------------------------------------

    def dispatch(
        self,
        now: float,
        deliverable: Callable[[QueueState], StoredTask | None],
        deliver: Callable[[C, StoredTask, QueueState], None],
        may_take: Callable[[C], bool],
    ) -> bool:
        """Hand out tasks in the queues woken since the last turn (a task came, a consumer came or got room): the
        others have nothing to hand out, however many there are. ``deliverable`` takes a queue's next task that may be
        delivered, ``deliver`` hands it to a consumer, ``may_take`` says whether a consumer may get one more in this
        turn (a burst per turn, so that a consumer without a prefetch limit is not handed its whole backlog at once).
        Returns whether a queue still has work for a consumer that had its burst: the next turn should come at once.
        """
        more = False
        for queue in self.take_woken(now):
            consumers = queue.consumers
            if not consumers or not len(queue):
                continue
            count = len(consumers)
            idle = 0
            capped = False
            # Round robin over consumers with room, one task each per pass, so that work spreads evenly. The turn
            # passes on only once a consumer got a task: tasks sent one at a time (AiiDA's submit) alternate between
            # consumers instead of all going to the first one.
            while idle < count:
                consumer = t.cast(C, consumers[queue.next_consumer % count])
                if consumer.stalled or consumer.room(queue.name) <= 0 or not may_take(consumer):
                    capped = capped or not (consumer.stalled or consumer.room(queue.name) <= 0)
                    queue.next_consumer += 1
                    idle += 1
                    continue
                task = deliverable(queue)
                if task is None:
                    capped = False
                    break  # nothing deliverable here now; other queues may still have work
                queue.next_consumer += 1
                idle = 0
                deliver(consumer, task, queue)
            if capped and len(queue):
                self.wake(queue.name)
                more = True
        return more
