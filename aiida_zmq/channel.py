"""The client's inner interface: how each part of a communicator reaches the broker.

A :class:`Channel` holds what the parts share: the session (:class:`aiida_zmq.session.Session`, its socket and I/O
thread) and its table of pending requests (:class:`aiida_zmq.pending.Pending`), the codec and the size limit, the
timeouts, each caller thread's own socket (:class:`aiida_zmq.direct.DirectSocket`), and the tasks this client holds.
:class:`aiida_zmq.communicator.ZmqCommunicator` (the kiwipy API, on callers' threads) and
:class:`aiida_zmq.inbound.Inbound` (what the broker sends, on the I/O and callback threads) use it, and it is the
task channel (:class:`aiida_zmq.tasks.TaskChannel`) that task queues and incoming tasks receive.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import kiwipy

from . import protocol
from .direct import DirectSocket
from .exceptions import MessageTooLarge, NoAnswer
from .protocol import Command
from .ratelimit import RateLimitedLog
from .security import CurveKeys
from .session import Session, broker_error
from .subscribers import Subscribers
from .tasks import ZmqIncomingTask

__all__ = ('MAX_NAME_BYTES', 'SELF_DELIVERY_WAIT', 'Channel', 'NoAnswer', 'answer_error', 'encode_name')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

#: Longest queue name or RPC identifier, in UTF-8 bytes (AMQP's limit on names and routing keys).
MAX_NAME_BYTES = 255
#: How long a caller's ``task_send`` waits for its own subscriber to take a task the broker handed to this same
#: communicator (seconds); see :meth:`Taken.wait`.
SELF_DELIVERY_WAIT = 5.0

Encoder = Callable[[Any], 'bytes | str']
Decoder = Callable[[bytes], Any]


class Channel:
    """See the module docstring. Each attribute says which thread owns it."""

    def __init__(
        self,
        endpoint: str,
        *,
        subscribers: Subscribers,
        name: str,
        encoder: Encoder,
        decoder: Decoder,
        heartbeat: float,
        broker_timeout: float,
        confirm_timeout: float,
        request_timeout: float,
        max_message_bytes: int,
        curve: CurveKeys | None,
    ) -> None:
        # Set once here, read by every thread.
        self.endpoint = endpoint
        self.name = name
        self.routing_id = b'c' + uuid.uuid4().hex.encode()
        self.decode = decoder
        self._encoder = encoder
        self.broker_timeout = broker_timeout
        self.confirm_timeout = confirm_timeout
        self.request_timeout = request_timeout
        self._curve = curve  # keys for a broker's tcp:// endpoint with CURVE (aiida_zmq.security.client_keys)
        self.session = Session(
            endpoint,
            routing_id=self.routing_id,
            name=name,
            heartbeat=heartbeat,
            broker_timeout=broker_timeout,
            curve=curve,
        )
        self.pending = self.session.pending  # thread-safe (its own lock)
        #: The registry of subscribers (thread-safe, its own lock). Set here, and replaced at most once by the owner
        #: (``ZmqCommunicator.adopt``) while it is empty: a thread that read the one before found nothing in it.
        self.subscribers = subscribers
        #: Written by the I/O thread at each WELCOME, read by callers: a read racing a WELCOME applies the limit before.
        self.max_message_bytes = max_message_bytes
        #: Set once by ``close()`` (any thread), read by every thread.
        self.closed = False
        self._correlations = itertools.count(1)  # next() on it is atomic (the GIL): any thread
        #: Task id -> attempt of the tasks this client holds: the I/O thread only.
        self.held: dict[int, int] = {}
        #: Held tasks whose final answer waits for the next WELCOME (the HELLO must still claim them): the I/O thread.
        self.answers_waiting: set[int] = set()
        #: Tasks whose subscribers were called: the callback thread marks, callers wait (a condition guards it).
        self.taken = Taken()
        # Weak references to the outcomes of tasks being processed (a task whose outcome is forgotten goes back):
        # added and dropped by any thread, as set.add/discard are atomic (the GIL).
        self._outcomes: set[weakref.ref] = set()
        #: Each caller thread's direct socket (weak: a thread's socket goes with the thread), for close() to close
        #: the idle ones; added to by callers (WeakSet.add is atomic under the GIL), read by close().
        self._local = threading.local()
        self.senders: weakref.WeakSet[DirectSocket] = weakref.WeakSet()

    # Any thread ------------------------------------------------------------------------------------------------------

    def ensure_open(self) -> None:
        if self.closed:
            raise kiwipy.CommunicatorClosed('the communicator is closed')

    def on_io_thread(self) -> bool:
        return self.session.on_io_thread()

    def not_on_io_thread(self, what: str) -> None:
        """Refuse to wait for the broker on the I/O thread, the thread that would have to bring the answer."""
        if self.session.on_io_thread():
            raise RuntimeError(
                f'cannot {what} and wait for the broker inside an RPC or broadcast subscriber: those run on the '
                "communicator's I/O thread (as kiwipy's do on its event loop). Return a future and do it from another "
                'thread.'
            )

    def call(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the I/O thread, in order with every other call."""
        self.session.call(function)

    def correlation(self) -> bytes:
        return protocol.number(next(self._correlations))

    def encode(self, value: Any) -> bytes:
        encoded = self._encoder(value)
        data = encoded.encode('utf-8') if isinstance(encoded, str) else bytes(encoded)
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(
                f'message of {len(data)} bytes exceeds the broker maximum of {self.max_message_bytes} bytes: '
                'send a reference (a node pk, a file path) instead of the data'
            )
        return data

    def request_done(self, correlation: bytes, frames: list[bytes]) -> concurrent.futures.Future:
        """Send a request the broker answers ``DONE``; the future is done then (or fails with the broker's error)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.call(lambda: self.session.io_expect_done(correlation, frames, done))
        return done

    def wait_done(self, done: concurrent.futures.Future, timeout: float) -> bool:
        """Wait for a request's answer; ``False`` if none came in time. Raises what the answer raises.

        On the I/O thread, which would have to bring the answer, it does not wait (and answers ``True``): what is in
        force when such a call returns is then only what the broker does next, in order.
        """
        if self.session.on_io_thread():
            return True
        try:
            done.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def forget(self, correlation: bytes) -> None:
        """A caller stopped waiting for a request (no answer in time): it is not to go out any more."""
        self.call(lambda: self.session.io_forget(correlation))

    def direct(self, correlation: bytes, frames: list[bytes], timeout: float) -> protocol.Message:
        """Send on this thread's own socket and return the broker's answer (see :class:`DirectSocket`).

        :raises NoAnswer: when none came within ``timeout`` seconds.
        """
        direct: DirectSocket | None = getattr(self._local, 'direct', None)
        if direct is None or direct.closed:
            direct = self._local.direct = DirectSocket(self.session, self._curve, lambda: self.closed)
            self.senders.add(direct)
        return direct.request(correlation, frames, timeout)

    def close(self) -> None:
        """Mark closed; close the idle direct sockets (a busy one is closed by its thread, which sees ``closed``)."""
        self.closed = True
        for sender in list(self.senders):
            sender.close_if_idle()
        self.taken.wake_all()  # a sender waiting for its own subscriber gives up

    # The task channel (aiida_zmq.tasks.TaskChannel) ------------------------------------------------------------------

    def send_task(self, queue: str, task: Any, no_reply: bool) -> kiwipy.Future | None:
        self.ensure_open()
        self.not_on_io_thread('send a task')
        queue_frame = encode_name(queue, 'a task queue name')
        payload = self.encode(task)
        correlation = self.correlation()
        # The session gets the result (unless no_reply), and the confirm says whether the task went to it.
        frames = protocol.encode(
            Command.TASK_SUBMIT, correlation, self.session.secret, queue_frame, protocol.flag(no_reply), payload
        )
        result: kiwipy.Future | None = None
        if not no_reply:
            # Known before the send: the consumer's answer may reach the I/O thread before the confirm reaches us.
            result = kiwipy.Future()
            self.pending.add(correlation, Command.TASK_RESULT, result)
        try:
            # As RmqThreadCommunicator waits for RabbitMQ's publisher confirm: return once the task is on disk.
            answer = self.direct(correlation, frames, self.confirm_timeout)
            if answer.command is not Command.TASK_CONFIRM:
                raise answer_error(answer)
        except NoAnswer:
            self.pending.forget(correlation)
            raise kiwipy.DeliveryFailed(
                f'the broker at {self.endpoint} did not confirm the task within {self.confirm_timeout:.0f}s; it may '
                'or may not have been stored. Check the broker with `aiida-zmq status`.'
            ) from None
        except BaseException:
            self.pending.forget(correlation)
            raise
        if answer.args[2] == protocol.FLAG_TRUE:  # held_here
            self.taken.wait(protocol.to_int(answer.args[1]), lambda: self.closed)
        return result

    def consume(self, queue: str, prefetch: int | None) -> None:
        """Start (``prefetch``) or stop (``None``) consuming ``queue``, waiting (bounded) for the broker's answer."""
        correlation = self.correlation()
        if prefetch is None:
            frames = protocol.encode(Command.CANCEL, correlation, queue.encode())
        else:
            frames = protocol.encode(Command.CONSUME, correlation, queue.encode(), protocol.number(prefetch))
        if not self.wait_done(self.request_done(correlation, frames), self.request_timeout):
            LIMITED.warning(
                'the broker at %s did not answer a %s of queue %s in time: it will on reconnection',
                self.endpoint,
                'subscription' if prefetch is not None else 'cancellation',
                queue,
                key='consume-timeout',
            )

    def get_task(self, queue: str, timeout: float) -> ZmqIncomingTask | None:
        """The next task of ``queue`` (``None`` when it has none), taken from the broker one by one."""
        self.ensure_open()
        self.not_on_io_thread('take a task from a queue')
        future: concurrent.futures.Future = concurrent.futures.Future()
        correlation = self.correlation()
        frames = protocol.encode(Command.TASK_GET, correlation, queue.encode())

        def request() -> None:
            self.pending.add(correlation, Command.TASK_GOT, future)
            self.session.io_request(correlation, frames)

        self.call(request)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the task, if it still comes, goes back (Inbound)
            raise kiwipy.TimeoutError(f'the broker did not answer within {timeout}s') from None

    def answer_task(self, task_id: int, attempt: int, frames: list[bytes], final: bool) -> None:
        """Send a held task's answer (reply, acknowledgement, or give-back); with the final one it is no longer held."""

        def send() -> None:
            if final and not self.session.io_welcomed:
                # No session now: the answer goes after our next HELLO, which must still claim the task, or the
                # broker would take it back (or, restarted, requeue it after its grace) and it would run again.
                self.answers_waiting.add(task_id)
            elif final:
                self.held.pop(task_id, None)
            self.session.io_send(frames)

        if self.session.on_io_thread():
            send()
        else:
            self.call(send)

    def keep_outcome(self, reference: weakref.ref) -> None:
        self._outcomes.add(reference)

    def drop_outcome(self, reference: weakref.ref) -> None:
        self._outcomes.discard(reference)


class Taken:
    """The tasks handed to this client whose subscribers were called (the last 1000): what a sender waits for when the
    broker gave its task to this same client.

    Why: with RabbitMQ, a task a process sends to itself reaches its subscriber while its ``task_send`` still waits
    (for the confirm, through the communicator's one loop thread). plumpy relies on that: its subscriber schedules the
    work on the caller's event loop and then adds a done callback from the communicator's thread, which asyncio's
    debug mode rejects if the loop already finished the work. Here the confirm reaches the caller on its own socket
    while the task is handed to the callback thread, so the caller's loop would run ahead; waiting for the hand-over
    gives back RabbitMQ's order. Not from the callback thread itself, which is the one that must take the task.

    Threads: the callback thread marks, callers wait; the condition guards the set.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._ids: set[int] = set()
        self._order: collections.deque[int] = collections.deque()
        #: Ident of the callback thread, set by that thread when it starts.
        self.callback_thread: int | None = None

    def mark(self, task_id: int) -> None:
        with self._condition:
            self._ids.add(task_id)
            self._order.append(task_id)
            if len(self._order) > 1000:
                self._ids.discard(self._order.popleft())
            self._condition.notify_all()

    def wait(self, task_id: int, closed: Callable[[], bool], timeout: float = SELF_DELIVERY_WAIT) -> None:
        """Wait (at most ``timeout``) until the subscribers of ``task_id`` were called, or the client closed."""
        if threading.get_ident() == self.callback_thread:
            return
        deadline = time.monotonic() + timeout
        with self._condition:
            while task_id not in self._ids and not closed():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._condition.wait(remaining)

    def wake_all(self) -> None:
        with self._condition:
            self._condition.notify_all()


def encode_name(value: Any, what: str) -> bytes:
    """A queue name or RPC identifier as its frame, checked where the caller can be told (the I/O thread must not
    fail on it): a non-empty ``str`` of at most :data:`MAX_NAME_BYTES` bytes of UTF-8.

    :raises TypeError: for anything but a ``str``.
    :raises ValueError: for an empty, too long or unencodable name (a lone surrogate).
    """
    if not isinstance(value, str):
        raise TypeError(f'{what} must be a str, not {type(value).__name__} ({value!r})')
    try:
        data = value.encode('utf-8')
    except UnicodeEncodeError as exception:
        raise ValueError(f'{what} {value!r} is not valid text ({exception.reason}): use a plain UTF-8 name') from None
    if not data:
        raise ValueError(f'{what} must not be empty')
    if len(data) > MAX_NAME_BYTES:
        raise ValueError(f'{what} is {len(data)} bytes long in UTF-8: at most {MAX_NAME_BYTES} are allowed')
    return data


def answer_error(answer: protocol.Message) -> Exception:
    """The exception for a direct request's answer that is not the one it hoped for (``ERROR``, ``RPC_UNROUTABLE``)."""
    args = answer.args
    if answer.command is Command.RPC_UNROUTABLE:
        return kiwipy.UnroutableError(bytes(args[1]).decode(errors='replace'))
    if answer.command is Command.ERROR:
        return broker_error(bytes(args[1]), bytes(args[2]).decode(errors='replace'))
    return kiwipy.DeliveryFailed(f'unexpected answer {answer.command.name} from the broker')
