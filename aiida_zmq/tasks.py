"""Task queues of a communicator and the tasks it is handed: answer them, put them back, or forget them.

:class:`ZmqTaskQueue` and :class:`ZmqIncomingTask` are what kiwipy's ``task_queue(name)`` and a task subscriber's
caller see. What they need of the communicator is a :class:`TaskChannel` (implemented by
:class:`aiida_zmq.channel.Channel`), with the communicator's registry of subscribers
(:class:`aiida_zmq.subscribers.Subscribers`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import typing as t
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import kiwipy
import shortuuid
from kiwipy.rmq.utils import exception_response, result_response

from . import protocol
from .protocol import Command
from .replies import follow_future
from .subscribers import Subscribers

__all__ = ('TASK_FINISHED', 'TASK_PENDING', 'TASK_PROCESSING', 'TASK_REQUEUED', 'TaskChannel', 'ZmqIncomingTask',
           'ZmqTaskQueue')  # fmt: skip

TASK_PENDING = 'pending'
TASK_PROCESSING = 'processing'
TASK_FINISHED = 'finished'
TASK_REQUEUED = 'requeued'


class TaskChannel(t.Protocol):
    """What task queues and incoming tasks need of their communicator (any thread may call it)."""

    #: The communicator's registry of subscribers.
    subscribers: Subscribers

    def ensure_open(self) -> None:
        """Raise :class:`kiwipy.CommunicatorClosed` once the communicator is closed."""

    def send_task(self, queue: str, task: Any, no_reply: bool) -> kiwipy.Future | None:
        """Send ``task`` to ``queue``; return once the broker stored it, with the future of its result."""

    def consume(self, queue: str, prefetch: int | None) -> None:
        """Start (``prefetch``) or stop (``None``) consuming ``queue``; return once the broker answered (bounded)."""

    def get_task(self, queue: str, timeout: float) -> ZmqIncomingTask | None:
        """Take the next task of ``queue`` from the broker; ``None`` when it has none."""

    def decode(self, payload: bytes) -> Any:
        """The message in ``payload``."""

    def encode(self, value: Any) -> bytes:
        """``value`` as a payload, within the broker's size limit."""

    def answer_task(self, task_id: int, attempt: int, frames: list[bytes], final: bool) -> None:
        """Send the answer of a held task; with the ``final`` one this client no longer holds it."""

    def keep_outcome(self, reference: weakref.ref) -> None:
        """Keep the weak reference to a task's outcome alive, so its callback fires when the outcome is forgotten."""

    def drop_outcome(self, reference: weakref.ref) -> None:
        """Stop keeping it."""


class ZmqTaskQueue:
    """A named task queue of a communicator: send to it, subscribe to it, or take tasks from it one by one.

    ``prefetch_count`` is set by callers (``task_queue(name, prefetch_count=...)``) and read when the queue's first
    subscriber comes, or when the session registers again.
    """

    def __init__(self, channel: TaskChannel, name: str, prefetch_count: int = 0) -> None:
        self._channel = channel
        self.name = name
        self.prefetch_count = prefetch_count

    def task_send(self, task: Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self._channel.send_task(self.name, task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: Any = None) -> Any:
        """Add a task subscriber; the broker hands this communicator tasks of the queue once this returns.

        If the broker does not answer within ``request_timeout`` (it is restarting), the subscriber is kept and the
        broker learns of it when it is back, as of every consumer of this session.
        """
        self._channel.ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        if self._channel.subscribers.add_task(self.name, identifier, subscriber):
            self._channel.consume(self.name, self.prefetch_count)
        return identifier

    def remove_task_subscriber(self, identifier: Any) -> None:
        """Remove a task subscriber; with the last one gone, the broker hands out no more tasks here."""
        self._channel.ensure_open()
        if self._channel.subscribers.remove_task(self.name, identifier):
            self._channel.consume(self.name, None)

    def _get(self, timeout: float) -> ZmqIncomingTask | None:
        return self._channel.get_task(self.name, timeout)

    @contextlib.contextmanager
    def next_task(self, no_ack: bool = False, fail: bool = True, timeout: float = 5.0) -> Iterator[ZmqIncomingTask]:
        """The next task of the queue; it goes back to the queue unless it was processed inside the block.

        :raises kiwipy.QueueEmpty: when the queue has no task.
        """
        task = self._get(timeout)
        if task is None:
            raise kiwipy.QueueEmpty(f"the queue '{self.name}' is empty")
        try:
            yield task
        finally:
            if task.state == TASK_PENDING:
                task.requeue()

    def __iter__(self) -> Iterator[ZmqIncomingTask]:
        """Take every task of the queue in turn; those not processed go back when the iteration ends."""
        taken: list[ZmqIncomingTask] = []
        try:
            while True:
                task = self._get(5.0)
                if task is None:
                    return
                taken.append(task)
                yield task
        finally:
            for task in taken:
                if task.state == TASK_PENDING:
                    task.requeue()


class ZmqIncomingTask:
    """A task handed to this client: answer it (result, exception), or put it back."""

    def __init__(self, channel: TaskChannel, task_id: int, attempt: int, no_reply: bool, payload: bytes) -> None:
        self._channel = channel
        self.task_id = task_id
        self.attempt = attempt
        self._no_reply = no_reply
        self._payload = payload
        # The holder's: the thread that runs its subscriber (the callback thread) or took it (next_task), and then
        # whichever thread sets its outcome. One at a time, not guarded: kiwipy's RMQ task is no safer.
        self._state = TASK_PENDING
        self._decoded = False
        self._body: Any = None
        self._outcome_ref: weakref.ref | None = None

    @property
    def body(self) -> Any:
        if not self._decoded:
            self._body = self._channel.decode(self._payload)
            self._decoded = True
        return self._body

    @property
    def no_reply(self) -> bool:
        return self._no_reply

    @property
    def state(self) -> str:
        return self._state

    def process(self) -> kiwipy.Future:
        """Start processing: the task is answered when the returned future is done.

        A future dropped without an outcome (garbage-collected) gives the task back, as kiwipy's RMQ task does.
        """
        if self._state != TASK_PENDING:
            raise kiwipy.InvalidStateError(f'The task is {self._state}')
        self._state = TASK_PROCESSING
        outcome: kiwipy.Future = kiwipy.Future()
        outcome.add_done_callback(self._on_outcome)
        # The communicator keeps the weak reference alive, so the callback fires even if this task object goes too.
        self._outcome_ref = weakref.ref(outcome, self._outcome_forgotten)
        self._channel.keep_outcome(self._outcome_ref)
        return outcome

    def _outcome_forgotten(self, reference: weakref.ref) -> None:
        self._channel.drop_outcome(reference)
        if self._state == TASK_PROCESSING:
            self.requeue()

    @contextlib.contextmanager
    def processing(self) -> Iterator[kiwipy.Future]:
        """Process inside the block; a task whose outcome is not set when the block ends goes back to the queue."""
        if self._state != TASK_PENDING:
            raise kiwipy.InvalidStateError(f'The task is {self._state}')
        self._state = TASK_PROCESSING
        outcome: kiwipy.Future = kiwipy.Future()
        try:
            yield outcome
        except Exception as exception:
            if not outcome.done():
                outcome.set_exception(exception)
            raise
        finally:
            if outcome.done():
                self._on_outcome(outcome)
            else:
                self._state = TASK_PENDING
                self.requeue()

    def _on_outcome(self, outcome: concurrent.futures.Future) -> None:
        if self._outcome_ref is not None:
            self._channel.drop_outcome(self._outcome_ref)
            self._outcome_ref = None
        if outcome.cancelled():
            self._state = TASK_PENDING
            self.requeue()
            return
        try:
            response = result_response(outcome.result())
        except Exception as exception:
            response = exception_response(exception)
        self.finish(response)

    def requeue(self) -> None:
        """Give the task back unprocessed (does not count as a delivery)."""
        if self._state not in (TASK_PENDING, TASK_PROCESSING):
            raise kiwipy.InvalidStateError(f'The task is {self._state}')
        self._state = TASK_REQUEUED
        self._nack(rejected=False)

    def reject(self) -> None:
        """Refuse the task: it goes back after a backoff and counts toward the dead-letter cap."""
        self._state = TASK_REQUEUED
        self._nack(rejected=True)

    def requeue_from_io(self) -> None:
        self._state = TASK_REQUEUED
        self._channel.answer_task(self.task_id, self.attempt, self._nack_frames(False), True)

    def _nack_frames(self, rejected: bool) -> list[bytes]:
        return protocol.encode(
            Command.TASK_NACK, protocol.number(self.task_id), protocol.number(self.attempt), protocol.flag(rejected)
        )

    def _nack(self, rejected: bool) -> None:
        self._channel.answer_task(self.task_id, self.attempt, self._nack_frames(rejected), True)

    def finish_with(self, result: Any) -> None:
        """Answer with a subscriber's return value, following futures (pending answers) as kiwipy does; a task sent
        with ``no_reply`` is acknowledged once the last of them is done, whatever its outcome."""
        follow_future(result, self._answer)

    def finish(self, response: dict) -> None:
        self._answer(True, response)

    def _answer(self, final: bool, response: dict | None) -> None:
        task_id, attempt = protocol.number(self.task_id), protocol.number(self.attempt)
        if final:
            self._state = TASK_FINISHED
        if self._no_reply:
            if not final:
                return
            frames = protocol.encode(Command.TASK_ACK, task_id, attempt)
        else:
            try:
                data = self._channel.encode(response)
            except Exception as exception:
                data = self._channel.encode(exception_response(exception))
            frames = protocol.encode(Command.TASK_REPLY, task_id, attempt, protocol.flag(final), data)
        self._channel.answer_task(self.task_id, self.attempt, frames, final)
