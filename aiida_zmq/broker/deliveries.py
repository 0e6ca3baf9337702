"""Deliveries: what a delivery is, and every rule of redelivery (``docs/protocol.md``, "Redeliveries").

A delivery is a task handed to one client, its holder, with an attempt number (the task's delivery count). The
holder keeps it in its :class:`Held` until it answers (ACK, a final REPLY, NACK) or loses it; an answer counts only
for the delivery the holder has, by task id and attempt, so that a late answer for a delivery taken away changes
nothing. The rules, all here:

- a task is delivered at most ``max_deliveries`` times; one that has had them all goes to the dead-letter queue,
  when it is next handed out or given back;
- a delivery given back (:meth:`Deliveries.give_back`): ``REFUSED`` counts and backs off, ``RELEASED`` of a task that
  was fetched (TASK_GET) or held ``quick_release`` seconds or more is not a delivery (back at once, same attempt),
  ``LOST`` counts and goes back at once; a back-off doubles per delivery, from ``retry_backoff`` to
  ``retry_backoff_max``, and its row stays delivered meanwhile (after a crash it is an orphan, not ready twice);
- a holder gone (BYE, silence, slow-client rule, peer-gone): every held task is given back, newest first;
- a holder saying HELLO again: what it holds and does not list is lost (its answers were lost);
- orphans: tasks delivered before a restart wait ``reclaim_grace`` for their holder to reclaim them at HELLO (same
  attempt), or to answer them from no session; after that they are requeued;
- a batch whose commit failed: its deliveries were never sent, so they are undone (same attempt, back at the front);
- an operator's requeue of dead letters starts their delivery count again.

This module knows tasks, queues, the store and the holder's :class:`Held`; it sends nothing (the broker's handlers
and batch do) and imports nothing of the broker's other rooms but config and queues.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import time
import typing as t

from ..names import printable_id
from ..ratelimit import RateLimitedLog
from ..store import DEAD, DELIVERED, READY, StoredTask, TaskStore
from .config import BrokerConfig
from .queues import QueueState, TaskQueues

__all__ = ('LOST', 'REFUSED', 'RELEASED', 'Deliveries', 'Held', 'Holder')

LOGGER = logging.getLogger(__name__)

# How a delivery ended without an answer (see Deliveries.give_back).
REFUSED, RELEASED, LOST = 'refused', 'released', 'lost'


class Held:
    """The deliveries one client holds: task id to task, when each was handed out (monotonic), which were fetched
    by TASK_GET rather than pushed, and how many per queue (what its prefetch leaves room for)."""

    __slots__ = ('fetched', 'per_queue', 'since', 'tasks')

    def __init__(self) -> None:
        self.tasks: dict[int, StoredTask] = {}
        self.since: dict[int, float] = {}
        self.fetched: set[int] = set()
        self.per_queue: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self.tasks)

    def holds(self, task: StoredTask) -> bool:
        """Whether this very delivery is still held (not taken back, not answered)."""
        return self.tasks.get(task.id) is task

    def in_queue(self, queue: str) -> int:
        return self.per_queue[queue]

    def newest_first(self) -> list[StoredTask]:
        """Held tasks, newest first: given back in this order, each goes to the front of its queue."""
        return sorted(self.tasks.values(), key=lambda task: -task.id)


class Holder(t.Protocol):
    """A client as deliveries see it (:class:`aiida_zmq.broker.peers.Client`)."""

    name: str
    routing_id: bytes
    held: Held
    pid: int
    proof: str  # of its session's secret (sessions.py): stored with what it holds, checked when it reclaims


class Deliveries:
    """Hands out, takes back and redelivers tasks; runs on the broker's loop thread, like the whole broker."""

    def __init__(
        self, config: BrokerConfig, queues: TaskQueues, stats: collections.Counter[str], log: RateLimitedLog
    ) -> None:
        self.config = config
        self.queues = queues
        self.stats = stats
        self.limited_log = log
        self._store: TaskStore | None = None
        self.orphans: dict[int, StoredTask] = {}  # tasks delivered before a restart, waiting for their holder
        self._orphan_holders: dict[int, str] = {}  # orphan id -> proof of its holder's secret, as stored
        self._orphan_deadline = 0.0
        self._delayed: list[tuple[float, int, StoredTask]] = []  # (due, id, task): tasks backing off

    @property
    def store(self) -> TaskStore:
        assert self._store is not None, 'the broker is not started'
        return self._store

    def open(self, store: TaskStore, now: float) -> None:
        """Start on ``store``: what it holds as delivered was delivered before a restart; orphans until reclaimed,
        for the reclaim grace from ``now`` (listening time, as :meth:`tick`'s: see liveness.py)."""
        self._store = store
        for task in store.load_delivered():
            self.orphans[task.id] = task
        self._orphan_holders = store.delivered_holders()
        self._orphan_deadline = now + self.config.grace

    def close(self) -> None:
        self._store = None

    # Handing out --------------------------------------------------------------------------------------------------

    def next_task(self, queue: QueueState) -> StoredTask | None:
        """Next task of the queue that has deliveries left; dead-letters those that have none."""
        while True:
            task = queue.pop(self.store, self.config)
            if task is None:
                return None
            if task.attempts < self.config.max_deliveries:
                return task
            self._dead_letter(task)

    def deliver(self, holder: Holder, task: StoredTask, fetched: bool) -> None:
        """Hand ``task`` to ``holder`` (staged in this batch; the broker sends it after the commit)."""
        task.attempts += 1
        task.state = DELIVERED
        self._hold(holder, task, time.monotonic(), fetched)
        # Who holds it is stored with it (the proof of its session's secret, in the row's reason): after a restart,
        # only that session may reclaim it.
        self.store.stage(task.id, DELIVERED, task.attempts, holder.proof)
        how = 'taken (next_task)' if fetched else 'pushed'
        self.store.history.record(
            task.id, 'delivered', f'to {holder.name} (pid {holder.pid}), delivery {task.attempts}, {how}'
        )
        self.stats['deliveries'] += 1

    # Answers ------------------------------------------------------------------------------------------------------

    def answered(self, holder: Holder, task_id: int, attempt: int) -> StoredTask | None:
        """The held delivery an answer is for, or None for a late answer (counted, logged, changing nothing)."""
        task = holder.held.tasks.get(task_id)
        if task is None or task.attempts != attempt:
            # A late answer for a delivery that was taken away (the client was silent too long, or reclaimed late).
            self.stats['late_acks_refused'] += 1
            self.limited_log.warning(
                'refused an answer from %s for task %d (attempt %d): it does not hold that delivery',
                holder.name,
                task_id,
                attempt,
                key=('late-answer', holder.routing_id),
            )
            return None
        return task

    def finish(self, holder: Holder, task: StoredTask) -> None:
        """The holder acknowledged the task (ACK or a final REPLY): it is done and deleted."""
        self._release(holder, task)
        self.store.delete((task.id,))
        self.store.history.record(task.id, 'answered', f'by {holder.name} (pid {holder.pid})')
        self.stats['tasks_acked'] += 1

    def give_back(self, holder: Holder, task: StoredTask, how: str, why: str) -> None:
        """The holder gave the task back (or lost it): it goes to its queue again, at once or after a backoff, or to
        the dead-letter queue when that was its last delivery. No client behaviour makes a task loop hot:

        - ``REFUSED`` (every subscriber refused it): counts, and backs off;
        - ``RELEASED`` (NACK rejected=0, or BYE while holding it): a task taken by ``next_task`` (TASK_GET) or held
          for ``quick_release`` seconds or more was looked at or worked on: not a delivery, back at once, first in
          line. A pushed task given back sooner (a subscriber raising CancelledError, a consumer saying BYE at once)
          counts, and backs off;
        - ``LOST`` (the holder died, or stopped reading): counts, back at once to another consumer.

        ``why`` (the holder was silent, said goodbye, refused it...) goes into the task's history with the outcome.
        """
        since = holder.held.since.get(task.id, -math.inf)
        fetched = task.id in holder.held.fetched
        self._release(holder, task)
        history = self.store.history
        if how == RELEASED and (fetched or time.monotonic() - since >= self.config.quick_release):
            task.attempts -= 1  # not a failed delivery: it is offered again with the same attempt number
            history.record(task.id, 'given back', f'{why}: back in its queue, first in line (not a delivery)')
            self._requeue(task)
        elif task.attempts >= self.config.max_deliveries:
            history.record(task.id, 'given back', f'{why}: that was its last delivery')
            self._dead_letter(task)
        elif how == LOST:
            history.record(task.id, 'given back', f'{why}: back in its queue for another consumer')
            self._requeue(task)
        else:
            self.stats['redeliveries_delayed'] += 1
            history.record(task.id, 'given back', f'{why}: offered again in {self._retry_delay(task):.1f} s')
            self._retry_later(task)

    def nack(self, holder: Holder, task: StoredTask, rejected: bool) -> None:
        """NACK: refused by every subscriber (``rejected``), or released."""
        if rejected:
            self.stats['tasks_rejected'] += 1
        if rejected:
            self.give_back(holder, task, REFUSED, 'refused by its holder (NACK)')
        else:
            self.give_back(holder, task, RELEASED, 'released by its holder (NACK)')

    # Sessions -----------------------------------------------------------------------------------------------------

    def hello(self, holder: Holder, claimed: dict[int, int], known: bool) -> int:
        """HELLO from ``holder``, listing (task id -> attempt) what it still works on; returns how many orphans it
        reclaimed. A ``known`` holder (it lost touch with us) loses what we think it holds and it does not list."""
        if known:
            for task in holder.held.newest_first():
                if claimed.get(task.id) != task.attempts:
                    self.give_back(holder, task, LOST, 'its holder reconnected without it')
        reclaimed = 0
        for task_id, attempt in claimed.items():
            orphan = self.orphans.get(task_id)
            if orphan is not None and orphan.attempts == attempt:
                if self._orphan_holders.get(task_id) != holder.proof:
                    self._refuse_claim(holder, task_id)
                    continue
                del self.orphans[task_id]
                self._hold(holder, orphan, since=-math.inf, fetched=False)  # held since before the restart
                self.store.history.record(task_id, 'reclaimed', f'by {holder.name} (pid {holder.pid}) after a restart')
                reclaimed += 1
        return reclaimed

    def holder_gone(self, holder: Holder, released: bool, why: str) -> None:
        """The holder's session ended: a BYE (``released``) or it died (``why``); its tasks go back at once."""
        for task in holder.held.newest_first():
            self.give_back(holder, task, RELEASED if released else LOST, why)

    def _refuse_claim(self, holder: Holder, task_id: int) -> None:
        self.stats['reclaims_refused'] += 1
        self.limited_log.warning(
            'refused the reclaim of task %d by %s (pid %d): another session held it before the restart',
            task_id,
            holder.name,
            holder.pid,
            key=('reclaim-refused', holder.routing_id),
        )

    def refuse_sessionless_answer(self, routing_id: bytes, args: t.Sequence[bytes]) -> None:
        """An answer (ACK, REPLY, NACK) from a socket without a session: refused and counted. Only the session that
        holds a task may answer it; an orphan's holder says HELLO with its secret, reclaims it, and answers it then
        (an answer sent to a restarted broker before that is lost, once, and the task redelivered: at least once)."""
        self.stats['sessionless_answers_refused'] += 1
        self.limited_log.warning(
            'refused an answer for task %s from a client without a session (%s): only the session holding a task '
            'answers it',
            printable_id(bytes(args[0]))[:24] if args else '?',
            printable_id(routing_id),
            key=('late-answer', routing_id),
        )

    # Time ---------------------------------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the next task backing off is due (monotonic), if any."""
        return self._delayed[0][0] if self._delayed else None

    def release_due(self, now: float) -> None:
        """Tasks whose backoff has passed go back to their queues."""
        while self._delayed and self._delayed[0][0] <= now:
            self._requeue(heapq.heappop(self._delayed)[2])

    def tick(self, now: float) -> None:
        """Orphans past their reclaim grace (in listening time) go back to their queues, counted: some may have
        been answered, the answer lost in flight when the broker stopped (the one way a task runs again)."""
        if self.orphans and now >= self._orphan_deadline:
            LOGGER.info('%d task(s) delivered before the restart were not reclaimed: requeued', len(self.orphans))
            self.stats['orphans_requeued'] += len(self.orphans)
            for task in sorted(self.orphans.values(), key=lambda t: -t.id):
                self.store.history.record(task.id, 'requeued', 'not reclaimed by its holder after the broker restarted')
                self._requeue(task)
            self.orphans.clear()
            self._orphan_holders.clear()

    # The batch ----------------------------------------------------------------------------------------------------

    def undo(self, holder: Holder, task: StoredTask, stored_before: bool) -> None:
        """A delivery of a batch whose commit failed: never sent, so never a delivery. A task ``stored_before`` this
        batch goes back to the front with its attempt number; a new one is forgotten with the batch."""
        if holder.held.holds(task):
            self._release(holder, task)
        if stored_before:
            task.attempts -= 1
            self._requeue(task)

    # Administration -----------------------------------------------------------------------------------------------

    def revive(self, tasks: t.Iterable[StoredTask]) -> None:
        """Dead letters an operator requeued (their rows ready with a fresh count): delivered again from attempt 1."""
        for task in tasks:
            task.attempts, task.state = 0, READY  # as TaskStore.revive_dead staged it
            self._queue(task.queue).put_back(task)
            self.queues.wake(task.queue)

    def backing_off(self) -> dict[int, float]:
        """Task id -> when (monotonic) it is offered again, for the tasks that back off now."""
        return {task_id: due for due, task_id, _ in self._delayed}

    def drop_delayed(self, queue: str) -> int:
        """Delete the tasks of ``queue`` that back off (a purge); returns how many."""
        dropped = [task.id for _, _, task in self._delayed if task.queue == queue]
        if dropped:
            self._delayed = [entry for entry in self._delayed if entry[2].queue != queue]
            heapq.heapify(self._delayed)
            self.store.delete(dropped)
            for task_id in dropped:
                self.store.history.record(task_id, 'purged', 'by an operator (tasks purge)')
        return len(dropped)

    # --------------------------------------------------------------------------------------------------------------

    def _hold(self, holder: Holder, task: StoredTask, since: float, fetched: bool) -> None:
        held = holder.held
        held.tasks[task.id] = task
        held.since[task.id] = since
        if fetched:
            held.fetched.add(task.id)
        held.per_queue[task.queue] += 1

    def _release(self, holder: Holder, task: StoredTask) -> None:
        held = holder.held
        del held.tasks[task.id]
        held.since.pop(task.id, None)
        held.fetched.discard(task.id)
        held.per_queue[task.queue] -= 1
        if not held.per_queue[task.queue]:
            del held.per_queue[task.queue]
        self.queues.wake(task.queue)  # the holder has room again

    def _queue(self, name: str) -> QueueState:
        """The queue of a task that exists (coming back, revived): made again if it was forgotten."""
        queue = self.queues.open(name, bounded=False)
        assert queue is not None
        return queue

    def _requeue(self, task: StoredTask) -> None:
        """Back to its queue at once (its row ready again with this batch)."""
        task.state = READY
        self.store.stage(task.id, READY, task.attempts)
        self._queue(task.queue).put_back(task)
        self.queues.wake(task.queue)

    def _retry_delay(self, task: StoredTask) -> float:
        """The backoff before a task given back is offered again: doubles per delivery."""
        return min(self.config.retry_backoff * 2 ** max(0, task.attempts - 1), self.config.retry_backoff_max)

    def _retry_later(self, task: StoredTask) -> None:
        """Back to its queue after a backoff (:meth:`_retry_delay`). Meanwhile its row stays delivered, so that
        after a crash it is an orphan (requeued after the reclaim grace) rather than ready twice."""
        heapq.heappush(self._delayed, (time.monotonic() + self._retry_delay(task), task.id, task))

    def _dead_letter(self, task: StoredTask) -> None:
        reason = f'delivered {task.attempts} times without an answer (max_deliveries={self.config.max_deliveries})'
        self.limited_log.error(
            'task %d of queue %s moved to the dead-letter queue: %s',
            task.id,
            task.queue,
            reason,
            key=('dead', task.queue),
        )
        task.state = DEAD
        self.store.stage(task.id, DEAD, task.attempts, reason)
        self.store.history.record(task.id, 'dead-lettered', reason)
        self.stats['dead_lettered'] += 1
