"""Task queues of a communicator and the tasks it is handed: answer them, put them back, or forget them.

:class:`ZmqTaskQueue` and :class:`ZmqIncomingTask` are what kiwipy's ``task_queue(name)`` and a task subscriber's
caller see; the I/O work is the communicator's (:class:`aiida_zmq.communicator.ZmqCommunicator`), here only handed
to it. :func:`follow_future` answers with kiwipy's responses, following nested futures, for tasks and RPCs alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import typing as t
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import kiwipy
import shortuuid
from kiwipy.rmq.utils import cancelled_response, exception_response, pending_response, result_response

from . import protocol
from .protocol import Command
from .ratelimit import RateLimitedLog

if t.TYPE_CHECKING:
    from .communicator import ZmqCommunicator

__all__ = ('TASK_FINISHED', 'TASK_PENDING', 'TASK_PROCESSING', 'TASK_REQUEUED', 'ZmqIncomingTask', 'ZmqTaskQueue',
           'follow_future')  # fmt: skip

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

TASK_PENDING = 'pending'
TASK_PROCESSING = 'processing'
TASK_FINISHED = 'finished'
TASK_REQUEUED = 'requeued'


class ZmqTaskQueue:
    """A named task queue of a communicator: send to it, subscribe to it, or take tasks from it one by one."""

    def __init__(self, communicator: ZmqCommunicator, name: str, prefetch_count: int = 0) -> None:
        self._communicator = communicator
        self.name = name
        self.prefetch_count = prefetch_count
        self._subscribers: dict[Any, Callable] = {}

    def task_send(self, task: Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self._communicator._send_task(self.name, task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: Any = None) -> Any:
        """Add a task subscriber; the broker hands this communicator tasks of the queue once this returns.

        If the broker does not answer within ``request_timeout`` (it is restarting), the subscriber is kept and the
        broker learns of it when it is back, as of every consumer of this session.
        """
        communicator = self._communicator
        communicator._ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        with communicator._lock:
            if identifier in self._subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Task identifier '{identifier}'")
            first = not self._subscribers
            self._subscribers[identifier] = subscriber
        if first:
            self._consume(self.prefetch_count)
        return identifier

    def remove_task_subscriber(self, identifier: Any) -> None:
        """Remove a task subscriber; with the last one gone, the broker hands out no more tasks here."""
        communicator = self._communicator
        communicator._ensure_open()
        with communicator._lock:
            try:
                del self._subscribers[identifier]
            except KeyError:
                raise ValueError(f"Unknown task subscriber '{identifier}'") from None
            last = not self._subscribers
        if last:
            self._consume(None)

    def _consume(self, prefetch: int | None) -> None:
        """Start (``prefetch``) or stop (``None``) consuming the queue, waiting for the broker's answer."""
        communicator = self._communicator
        done: concurrent.futures.Future = concurrent.futures.Future()
        communicator._call(lambda: communicator._io_consume(self.name, prefetch, done))
        if not communicator._wait_done(done, communicator._request_timeout):
            LIMITED.warning(
                'the broker at %s did not answer a %s of queue %s in time: it will on reconnection',
                communicator.endpoint,
                'subscription' if prefetch is not None else 'cancellation',
                self.name,
                key='consume-timeout',
            )

    def _get(self, timeout: float) -> ZmqIncomingTask | None:
        communicator = self._communicator
        communicator._ensure_open()
        communicator._not_on_io_thread('take a task from a queue')
        future: concurrent.futures.Future = concurrent.futures.Future()
        correlation = communicator._correlation()
        communicator._call(lambda: communicator._io_get(correlation, self.name, future))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise kiwipy.TimeoutError(f'the broker did not answer within {timeout}s') from None

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

    def __init__(
        self, communicator: ZmqCommunicator, task_id: int, attempt: int, no_reply: bool, payload: bytes
    ) -> None:
        self._communicator = communicator
        self.task_id = task_id
        self.attempt = attempt
        self._no_reply = no_reply
        self._payload = payload
        self._state = TASK_PENDING
        self._decoded = False
        self._body: Any = None
        self._outcome_ref: weakref.ref | None = None

    @property
    def body(self) -> Any:
        if not self._decoded:
            self._body = self._communicator._decoder(self._payload)
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
        self._communicator._outcome_refs.add(self._outcome_ref)
        return outcome

    def _outcome_forgotten(self, reference: weakref.ref) -> None:
        self._communicator._outcome_refs.discard(reference)
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
            self._communicator._outcome_refs.discard(self._outcome_ref)
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
        self._communicator._io_task_answer(self.task_id, self.attempt, self._nack_frames(False), True)

    def _nack_frames(self, rejected: bool) -> list[bytes]:
        return protocol.encode(
            Command.TASK_NACK, protocol.number(self.task_id), protocol.number(self.attempt), protocol.flag(rejected)
        )

    def _nack(self, rejected: bool) -> None:
        frames = self._nack_frames(rejected)
        communicator = self._communicator
        communicator._call(lambda: communicator._io_task_answer(self.task_id, self.attempt, frames, True))

    def finish_with(self, result: Any) -> None:
        """Answer with a subscriber's return value, following futures (pending answers) as kiwipy does."""
        if self._no_reply:
            if isinstance(result, concurrent.futures.Future):
                result.add_done_callback(lambda future: self.finish_with(_value_or_none(future)))
            else:
                self._answer(True, None)
            return
        follow_future(result, self._answer)

    def finish(self, response: dict) -> None:
        self._answer(True, response)

    def _answer(self, final: bool, response: dict | None) -> None:
        communicator = self._communicator
        task_id, attempt = protocol.number(self.task_id), protocol.number(self.attempt)
        if final:
            self._state = TASK_FINISHED
        if self._no_reply:
            if not final:
                return
            frames = protocol.encode(Command.TASK_ACK, task_id, attempt)
        else:
            try:
                data = communicator._encode(response)
            except Exception as exception:
                data = communicator._encode(exception_response(exception))
            frames = protocol.encode(Command.TASK_REPLY, task_id, attempt, protocol.flag(final), data)
        communicator._call(lambda: communicator._io_task_answer(self.task_id, self.attempt, frames, final))


def _value_or_none(future: concurrent.futures.Future) -> Any:
    with contextlib.suppress(BaseException):
        return future.result()
    return None


def follow_future(result: Any, answer: Callable[[bool, dict], None]) -> None:
    """Answer with ``result``; if it is a future, answer 'pending' and follow it (and any future it resolves to)."""
    if not isinstance(result, concurrent.futures.Future):
        answer(True, result_response(result))
        return
    answer(False, pending_response())

    def done(future: concurrent.futures.Future) -> None:
        if future.cancelled():
            answer(True, cancelled_response())
            return
        try:
            value = future.result()
        except Exception as exception:
            answer(True, exception_response(exception))
            return
        follow_future(value, answer)

    result.add_done_callback(done)
