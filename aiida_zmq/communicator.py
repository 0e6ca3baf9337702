"""A :class:`kiwipy.Communicator` over the aiida-zmq protocol, thread-safe like ``RmqThreadCommunicator``.

Three kinds of thread meet here:

- callers (any thread) call the public methods and hand work to the I/O thread, with three exceptions: a task send,
  a broadcast and an RPC to another client. For those, each caller thread sends on a socket of its own
  (:class:`DirectSocket`) and waits there for the broker's answer; the two thread hand-overs that saves were a third
  of a send's time;
- the I/O thread (:class:`aiida_zmq.session.Session`) owns the DEALER socket: it sends, receives, heartbeats,
  notices a lost or restarted broker and says HELLO again; this communicator then re-registers its subscriptions
  (:meth:`ZmqCommunicator.on_welcome`). It also runs RPC and broadcast
  subscribers, as kiwipy's RMQ communicator runs them on its event-loop thread: they answer at once or return a
  future, and running them here saves two thread hand-overs per call. They must not wait for the broker themselves
  (a blocking call from them raises a clear error instead of a deadlock);
- the callback thread runs task subscribers one at a time, so that slow user code (loading a process from the
  database) never delays heartbeats.

No subscriber runs on a caller's thread.

Sends are never dropped: what the socket cannot take yet waits in order, and messages the broker has to confirm
(tasks, registrations) are sent again after a reconnection until they are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import os
import socket as stdlib_socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import kiwipy
import shortuuid
from kiwipy.rmq.utils import (
    CANCELLED_KEY,
    EXCEPTION_KEY,
    PENDING_KEY,
    RESULT_KEY,
    exception_response,
)

from . import protocol
from .codec import Decoder, Encoder, default_codec
from .direct import DirectSocket, NoAnswer
from .endpoints import ipc_path
from .exceptions import (
    AdminError,
    BrokerRestarted,
    BrokerUnavailable,
    BrokerUnreachable,
    MessageTooLarge,
)
from .protocol import Command
from .ratelimit import RateLimitedLog
from .security import CurveKeys, check_ipc_endpoint
from .session import Session, broker_error
from .tasks import ZmqIncomingTask, ZmqTaskQueue, follow_future

__all__ = ('DEFAULT_TASK_QUEUE', 'ZmqCommunicator', 'ZmqIncomingTask', 'ZmqTaskQueue', 'connect', 'encode_name')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

DEFAULT_TASK_QUEUE = 'aiida_zmq.tasks'

#: How long a broadcast that arrived while this communicator had no broadcast subscriber waits for one: kiwipy's
#: ``MESSAGE_TTL`` on the broadcast queue RabbitMQ keeps for a communicator (seconds).
BROADCAST_TTL = 66.0
#: At most this many bytes of such broadcasts are kept; the oldest go first.
BROADCAST_HOLD_BYTES = 16 * 1024 * 1024
#: Longest queue name or RPC identifier, in UTF-8 bytes (AMQP's limit on names and routing keys).
MAX_NAME_BYTES = 255
#: How long a caller's ``task_send`` waits for its own subscriber to take a task the broker handed to this same
#: communicator (seconds); see :meth:`ZmqCommunicator._wait_taken`.
SELF_DELIVERY_WAIT = 5.0


def connect(endpoint: str | None = None, *, data_dir: str | os.PathLike[str] | None = None, **options: Any):
    """Return a started :class:`ZmqCommunicator` connected to the broker at ``endpoint`` (or found in ``data_dir``).

    :raises BrokerUnavailable: when no broker answers within ``connect_timeout`` seconds.
    """
    if endpoint is None:
        if data_dir is None:
            raise ValueError('give the broker endpoint (e.g. ipc:///path/broker.sock) or its data directory')
        from .discovery import choose_endpoint, read_live_broker_info

        data_dir = os.path.expanduser(data_dir)
        info = read_live_broker_info(data_dir)
        if info is None:
            raise BrokerUnavailable(
                f'no running aiida-zmq broker found in {data_dir}. Start it with `aiida-zmq serve --data-dir '
                f'{data_dir}` or, for an AiiDA profile, `verdi daemon start`.'
            )
        endpoint = choose_endpoint(info)
    communicator = ZmqCommunicator(endpoint, **options)
    communicator.start()
    return communicator


class ZmqCommunicator(kiwipy.Communicator):
    """kiwipy communicator for the aiida-zmq broker. Use :func:`connect` to get a started one."""

    def __init__(
        self,
        endpoint: str,
        *,
        encoder: Encoder | None = None,
        decoder: Decoder | None = None,
        task_queue: str = DEFAULT_TASK_QUEUE,
        task_prefetch_count: int = 0,
        heartbeat: float = 1.0,
        broker_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        confirm_timeout: float = 60.0,
        request_timeout: float = 60.0,
        name: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        curve: CurveKeys | None = None,
    ) -> None:
        if not endpoint.startswith(('ipc://', 'tcp://', 'inproc://')):
            raise ValueError(f'unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://127.0.0.1:PORT')
        codec = default_codec()
        self._encoder = encoder or codec.encode
        self._decoder = decoder or codec.decode
        self.endpoint = endpoint
        self.name = name or f'{stdlib_socket.gethostname()}:{os.getpid()}'
        self._heartbeat = heartbeat
        self._broker_timeout = broker_timeout
        self._connect_timeout = connect_timeout
        self._confirm_timeout = confirm_timeout
        self._request_timeout = request_timeout
        self._max_message_bytes = max_message_bytes
        self._curve = curve  # keys for a broker's tcp:// endpoint with CURVE (aiida_zmq.security.client_keys)
        self._routing_id = b'c' + uuid.uuid4().hex.encode()
        self._correlations = itertools.count(1)
        self._closed = False
        self._session = Session(
            endpoint,
            self,
            routing_id=self._routing_id,
            name=self.name,
            heartbeat=heartbeat,
            broker_timeout=broker_timeout,
            curve=curve,
        )
        self._io_thread = self._session.thread
        self._call = self._session.call  # run a function on the I/O thread, in order with every other call
        self._context = self._session.context

        # Subscribers: read by the I/O and callback threads, changed by callers.
        self._lock = threading.RLock()
        self._rpc_subscribers: dict[str, Callable] = {}
        self._broadcast_subscribers: dict[Any, Callable] = {}
        # This session's broadcast subscription, made once by the first RPC or broadcast subscriber (as kiwipy's RMQ
        # communicator binds its broadcast queue when it creates its message subscriber) and kept from then on.
        self._subscription: concurrent.futures.Future | None = None
        self._queues: dict[str, ZmqTaskQueue] = {}
        self._default_queue = self.task_queue(task_queue, prefetch_count=task_prefetch_count)
        # Tasks handed to this communicator whose subscribers were called (bounded): what a sender waits for when the
        # broker gave its task to this same communicator (see _wait_taken).
        self._taken = threading.Condition()
        self._taken_ids: set[int] = set()
        self._taken_order: collections.deque[int] = collections.deque()
        # Weak references to the outcomes of tasks being processed: a task whose outcome is forgotten goes back.
        self._outcome_refs: set[weakref.ref] = set()

        # I/O-thread state (the session's is in Session): touched only by the I/O thread.
        self._task_results: dict[bytes, concurrent.futures.Future] = {}
        self._rpc_results: dict[bytes, concurrent.futures.Future] = {}
        self._registrations: dict[bytes, tuple[str, concurrent.futures.Future]] = {}
        self._gets: dict[bytes, concurrent.futures.Future] = {}
        self._admin_calls: dict[bytes, concurrent.futures.Future] = {}
        self._unheard: collections.deque[tuple[float, bytes]] = collections.deque()  # broadcasts with no subscriber
        self._unheard_bytes = 0
        self._held: dict[int, int] = {}  # task id -> attempt, for tasks this client is processing
        self._answers_waiting: set[int] = set()  # held tasks whose final answer waits for the next WELCOME
        self._registered_rpc: set[str] = set()
        self._consuming: dict[str, int] = {}
        self._subscribed = False
        #: What the broker sends and the session passes on (SessionOwner.handlers), handled on the I/O thread.
        self.handlers: dict[Command, Callable[[Sequence[bytes]], None]] = {
            Command.TASK_DELIVER: self._io_on_task_deliver,
            Command.TASK_RESULT: self._io_on_task_result,
            Command.TASK_GOT: self._io_on_task_got,
            Command.RPC_REGISTERED: self._io_on_rpc_registered,
            Command.RPC_REQUEST: self._io_on_rpc_request,
            Command.RPC_RESULT: self._io_on_rpc_result,
            Command.RPC_UNROUTABLE: self._io_on_rpc_unroutable,
            Command.BROADCAST: self._io_on_broadcast,
            Command.ADMIN_REPLY: self._io_on_admin_reply,
        }

        self._callback_thread: int | None = None  # ident of the callback thread, once it started
        self._callbacks = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='aiida-zmq-callback', initializer=self._on_callback_thread
        )
        # Each caller thread's direct socket; the set (weak: a thread's socket goes with the thread) lets close() close
        # the idle ones.
        self._local = threading.local()
        self._senders: weakref.WeakSet[DirectSocket] = weakref.WeakSet()

    # Lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, say HELLO and wait for the broker's WELCOME.

        :raises aiida_zmq.exceptions.UnsafePath: at once, for an ``ipc://`` socket another user controls.
        """
        check_ipc_endpoint(self.endpoint)  # before anything is sent: a fake broker there would read and "confirm" it
        _refuse_missing_socket(self.endpoint)  # known at once: no broker there
        try:
            self._session.start(self._connect_timeout)
        except BaseException:
            self.close()
            raise

    def is_closed(self) -> bool:
        return self._closed

    def in_touch(self) -> bool:
        """Whether the broker answers: welcomed, and heard from within two heartbeats (not part of kiwipy)."""
        return self._session.in_touch()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._callbacks.shutdown(wait=False, cancel_futures=True)
        for sender in list(self._senders):
            sender.close_if_idle()  # a sender busy in another thread closes its socket itself, seeing _closed
        with self._taken:
            self._taken.notify_all()  # a sender waiting for its own subscriber gives up
        self._session.close()

    def _not_on_io_thread(self, what: str) -> None:
        """Refuse to wait for the broker on the I/O thread, the thread that would have to bring the answer."""
        if threading.current_thread() is self._io_thread:
            raise RuntimeError(
                f'cannot {what} and wait for the broker inside an RPC or broadcast subscriber: those run on the '
                "communicator's I/O thread (as kiwipy's do on its event loop). Return a future and do it from another "
                'thread.'
            )

    def _ensure_open(self) -> None:
        if self._closed:
            raise kiwipy.CommunicatorClosed('the communicator is closed')

    # kiwipy.Communicator: RPC -------------------------------------------------------------------------------------

    def add_rpc_subscriber(self, subscriber: Callable, identifier: Any = None) -> Any:
        """Register ``subscriber`` for RPCs to ``identifier``; it is reachable when this returns.

        :raises kiwipy.DuplicateSubscriberIdentifier: when this or another client of the broker holds ``identifier``.
        :raises kiwipy.TimeoutError: when the broker did not answer within ``request_timeout``.
        """
        self._ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        key = str(identifier)
        frame = encode_name(key, 'an RPC identifier')
        with self._lock:
            if key in self._rpc_subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"RPC identifier '{identifier}'")
            self._rpc_subscribers[key] = subscriber
        self._not_on_io_thread('add an RPC subscriber')
        # Subscribed to broadcasts from now on, as kiwipy's RMQ communicator binds its broadcast queue when it first
        # subscribes anything: the SUBSCRIBE goes out before the registration, so the answer to one covers both.
        self._subscribe()
        registered: concurrent.futures.Future = concurrent.futures.Future()
        self._call(lambda: self._io_register(key, frame, registered))
        try:
            status = registered.result(self._request_timeout)
        except BaseException:
            with self._lock:
                self._rpc_subscribers.pop(key, None)
            raise
        if status != b'ok':
            with self._lock:
                self._rpc_subscribers.pop(key, None)
            raise kiwipy.DuplicateSubscriberIdentifier(
                f"RPC identifier '{identifier}' is already taken by another client of this broker"
            )
        return identifier

    def remove_rpc_subscriber(self, identifier: Any) -> None:
        """Remove an RPC subscriber; once this returns the broker no longer routes calls for ``identifier`` here."""
        self._ensure_open()
        key = str(identifier)
        with self._lock:
            try:
                del self._rpc_subscribers[key]
            except KeyError:
                raise ValueError(f"Unknown subscriber '{identifier}'") from None
        frame = key.encode()  # checked when it was added
        correlation = self._correlation()
        done = self._request_done(correlation, protocol.encode(Command.RPC_UNREGISTER, correlation, frame))
        self._call(lambda: self._registered_rpc.discard(key))
        # Not answered in time (the broker is restarting): gone here already; the broker learns it when it is back.
        self._wait_done(done, self._request_timeout)

    def rpc_send(self, recipient_id: Any, msg: Any) -> kiwipy.Future:
        """Send an RPC; returns once the broker handed it to its recipient, with a future of the answer.

        :raises kiwipy.UnroutableError: at once when no client holds ``recipient_id`` (as ``RmqThreadCommunicator``
            raises from the call, which aiida-core's ``Process.kill`` relies on); :class:`BrokerUnreachable` (also an
            ``UnroutableError``) when the broker did not answer within ``broker_timeout``. Called from an RPC or
            broadcast subscriber (on the I/O thread, which brings the answer), it cannot wait: then the future fails
            with ``UnroutableError`` instead.
        """
        self._ensure_open()
        identifier = encode_name(str(recipient_id), 'an RPC recipient')
        payload = self._encode(msg)
        future: kiwipy.Future = kiwipy.Future()
        correlation = self._correlation()
        unreachable = BrokerUnreachable(
            f'the broker at {self.endpoint} did not route the RPC to {recipient_id!r} within '
            f'{self._broker_timeout:.0f}s (is it running? `aiida-zmq status`): it was not sent'
        )
        with self._lock:
            own = str(recipient_id) in self._rpc_subscribers
        if own or threading.current_thread() is self._io_thread:
            # Through the session: to one's own subscriber the request comes on the session ahead of the answer, so it
            # is handled when this returns; on the I/O thread nothing can wait.
            routed: concurrent.futures.Future = concurrent.futures.Future()
            frames = protocol.encode(Command.RPC_CALL, correlation, identifier, payload)
            self._call(lambda: self._io_rpc_call(correlation, frames, future, routed))
            if not self._wait_done(routed, self._broker_timeout):
                self._call(lambda: self._io_forget(correlation))
                raise unreachable
            return future
        # To another client: on this thread's own socket, the reply to the session (known before the send).
        frames = protocol.encode(Command.RPC_SUBMIT, correlation, self._routing_id, identifier, payload)
        self._rpc_results[correlation] = future
        try:
            answer = self._direct().request(correlation, frames, self._broker_timeout)
            if answer.command is not Command.DONE:
                raise _answer_error(answer)
        except NoAnswer:
            self._rpc_results.pop(correlation, None)
            raise unreachable from None
        except BaseException:
            self._rpc_results.pop(correlation, None)
            raise
        return future

    # kiwipy.Communicator: tasks -----------------------------------------------------------------------------------

    def add_task_subscriber(self, subscriber: Callable, identifier: Any = None) -> Any:
        return self._default_queue.add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: Any) -> None:
        return self._default_queue.remove_task_subscriber(identifier)

    def task_send(self, task: Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self._default_queue.task_send(task, no_reply)

    def task_queue(
        self, queue_name: str, prefetch_size: int | None = None, prefetch_count: int | None = None
    ) -> ZmqTaskQueue:
        """The task queue ``queue_name`` (one object per name and communicator).

        ``prefetch_count`` is how many of its tasks this communicator holds at once; 0 (the default, as kiwipy's) for no
        limit. ``prefetch_size`` (a byte limit in AMQP, unused by kiwipy and AiiDA) is not supported.
        """
        self._ensure_open()
        encode_name(queue_name, 'a task queue name')
        with self._lock:
            queue = self._queues.get(queue_name)
            if queue is None:
                queue = self._queues[queue_name] = ZmqTaskQueue(self, queue_name, prefetch_count or 0)
            elif prefetch_count is not None:
                queue.prefetch_count = prefetch_count
            return queue

    # kiwipy.Communicator: broadcasts ------------------------------------------------------------------------------

    def add_broadcast_subscriber(self, subscriber: Callable, identifier: Any = None) -> Any:
        """Add a broadcast subscriber; broadcasts the broker takes after this returns reach it.

        Broadcasts that reached this communicator since its first subscriber (of any kind), while it had no
        broadcast subscriber, and at most ``BROADCAST_TTL`` seconds ago, are handed to it first: RabbitMQ keeps them
        in the communicator's broadcast queue for as long.

        :raises kiwipy.TimeoutError: when the broker did not confirm the subscription within ``request_timeout``.
        """
        self._ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        with self._lock:
            if identifier in self._broadcast_subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Broadcast identifier '{identifier}'")
            self._broadcast_subscribers[identifier] = subscriber
        subscription = self._subscribe()
        if threading.current_thread() is not self._io_thread:
            try:
                subscription.result(self._request_timeout)
            except BaseException:
                with self._lock:
                    self._broadcast_subscribers.pop(identifier, None)
                raise
        self._call(self._io_deliver_unheard)
        return identifier

    def remove_broadcast_subscriber(self, identifier: Any) -> None:
        """Remove a broadcast subscriber: it gets nothing once this returns (the session stays subscribed)."""
        self._ensure_open()
        with self._lock:
            try:
                del self._broadcast_subscribers[identifier]
            except KeyError:
                raise ValueError(f"Broadcast subscriber '{identifier}' unknown") from None

    def broadcast_send(self, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None) -> bool:
        """Send a broadcast; returns ``True`` once the broker has it (it sends it to every subscriber in the same turn).

        ``False`` when the broker did not answer within ``broker_timeout`` (it is down or restarting; the broadcast
        goes out when it is back), as ``RmqThreadCommunicator`` answers ``False`` for a publish RabbitMQ did not ack.
        From an RPC or broadcast subscriber (the I/O thread) it cannot wait: ``True`` once queued.
        """
        self._ensure_open()
        message = {'body': body, 'sender': sender, 'subject': subject, 'correlation_id': correlation_id}
        payload = self._encode(message)
        correlation = self._correlation()
        frames = protocol.encode(Command.PUBLISH, correlation, payload)
        if threading.current_thread() is self._io_thread:
            self._request_done(correlation, frames)  # through the session, not waited for
            return True
        try:
            answer = self._direct().request(correlation, frames, self._broker_timeout)
        except NoAnswer:
            LIMITED.warning(
                'the broker at %s did not take a broadcast within %.0fs: it goes out once the broker is back',
                self.endpoint,
                self._broker_timeout,
                key='publish-timeout',
            )
            return False
        if answer.command is not Command.DONE:
            raise _answer_error(answer)
        return True

    def _subscribe(self) -> concurrent.futures.Future:
        """This session's broadcast subscription: asked for once (the first call), in force when the future is done."""
        with self._lock:
            subscription = self._subscription
            if subscription is None or (subscription.done() and subscription.exception() is not None):
                subscription = self._subscription = concurrent.futures.Future()
                correlation = self._correlation()
                frames = protocol.encode(Command.SUBSCRIBE, correlation)
                self._call(lambda: self._io_subscribe(correlation, frames, subscription))
            return subscription

    # Administration (not part of kiwipy) ---------------------------------------------------------------------------

    def admin(self, op: str, timeout: float | None = None, **arguments: Any) -> dict[str, Any]:
        """Ask the broker an administrative question (see ``docs/protocol.md``, ADMIN) and return its answer.

        :param op: ``status``, ``peer-gone`` (``pid=``), ``dead-letters`` (``queue=``), ``dead-letters-requeue``
            (``ids=``), ``dead-letters-drop`` (``ids=``), ``tasks`` (``queue=``, ``limit=``).
        :raises AdminError: when the broker refuses the request.
        """
        self._ensure_open()
        self._not_on_io_thread(f'ask the broker `{op}`')
        request = json.dumps({'op': op, **arguments}).encode()
        correlation = self._correlation()
        future: concurrent.futures.Future = concurrent.futures.Future()
        frames = protocol.encode(Command.ADMIN, correlation, request)
        self._call(lambda: self._io_admin(correlation, frames, future))
        try:
            return future.result(self._request_timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            self._call(lambda: self._forget_admin(correlation))
            raise TimeoutError(f'the broker at {self.endpoint} did not answer `{op}` in time') from None

    def _forget_admin(self, correlation: bytes) -> None:
        self._admin_calls.pop(correlation, None)
        self._session.io_forget(correlation)

    def _io_admin(self, correlation: bytes, frames: list[bytes], future: concurrent.futures.Future) -> None:
        self._admin_calls[correlation] = future
        self._session.io_request(correlation, frames)

    def _io_on_admin_reply(self, args: Sequence[bytes]) -> None:
        correlation, status, response = bytes(args[0]), bytes(args[1]), bytes(args[2])
        future = self._admin_calls.pop(correlation, None)
        if future is None or future.done():
            return
        try:
            value = json.loads(response)
        except ValueError as exception:
            future.set_exception(AdminError(f'unreadable answer from the broker: {exception}'))
            return
        if status == b'ok':
            future.set_result(value)
        else:
            future.set_exception(AdminError(str(value)))

    # Helpers for callers ------------------------------------------------------------------------------------------

    def _request_done(self, correlation: bytes, frames: list[bytes]) -> concurrent.futures.Future:
        """Send a request the broker answers ``DONE``; the future is done then (or fails with the broker's error)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._call(lambda: self._session.io_expect_done(correlation, frames, done))
        return done

    def _wait_done(self, done: concurrent.futures.Future, timeout: float) -> bool:
        """Wait for a request's answer; ``False`` if none came in time. Raises what the answer raises.

        On the I/O thread, which would have to bring the answer, it does not wait (and answers ``True``): what is in
        force when such a call returns is then only what the broker does next, in order.
        """
        if threading.current_thread() is self._io_thread:
            return True
        try:
            done.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def _correlation(self) -> bytes:
        return protocol.number(next(self._correlations))

    def _encode(self, value: Any) -> bytes:
        encoded = self._encoder(value)
        data = encoded.encode('utf-8') if isinstance(encoded, str) else bytes(encoded)
        if len(data) > self._max_message_bytes:
            raise MessageTooLarge(
                f'message of {len(data)} bytes exceeds the broker maximum of {self._max_message_bytes} bytes: '
                'send a reference (a node pk, a file path) instead of the data'
            )
        return data

    def _send_task(self, queue: str, task: Any, no_reply: bool) -> kiwipy.Future | None:
        self._ensure_open()
        self._not_on_io_thread('send a task')
        queue_frame = encode_name(queue, 'a task queue name')
        payload = self._encode(task)
        correlation = self._correlation()
        # The session gets the result (unless no_reply), and the confirm says whether the task went to it.
        frames = protocol.encode(
            Command.TASK_SUBMIT, correlation, self._routing_id, queue_frame, protocol.flag(no_reply), payload
        )
        result: kiwipy.Future | None = None
        if not no_reply:
            # Known before the send: the consumer's answer may reach the I/O thread before the confirm reaches us.
            result = kiwipy.Future()
            self._task_results[correlation] = result
        try:
            # As RmqThreadCommunicator waits for RabbitMQ's publisher confirm: return once the task is on disk.
            answer = self._direct().request(correlation, frames, self._confirm_timeout)
            if answer.command is not Command.TASK_CONFIRM:
                raise _answer_error(answer)
        except NoAnswer:
            self._task_results.pop(correlation, None)
            raise kiwipy.DeliveryFailed(
                f'the broker at {self.endpoint} did not confirm the task within {self._confirm_timeout:.0f}s; it may '
                'or may not have been stored. Check the broker with `aiida-zmq status`.'
            ) from None
        except BaseException:
            self._task_results.pop(correlation, None)
            raise
        if answer.args[2] == protocol.FLAG_TRUE:  # held_here
            self._wait_taken(protocol.to_int(answer.args[1]))
        return result

    def _wait_taken(self, task_id: int) -> None:
        """Wait (bounded) until this communicator's subscriber was called with a task it sent to itself.

        Why: with RabbitMQ, a task a process sends to itself reaches its subscriber while its ``task_send`` still
        waits (for the confirm, through the communicator's one loop thread). plumpy relies on that: its subscriber
        schedules the work on the caller's event loop and then adds a done callback from the communicator's thread,
        which asyncio's debug mode rejects if the loop already finished the work. Here the confirm reaches the caller
        on its own socket while the task is handed to the callback thread, so the caller's loop would run ahead;
        waiting here for the hand-over gives back RabbitMQ's order. Not from the callback thread itself, which is
        the one that must take the task.
        """
        if threading.get_ident() == self._callback_thread:
            return
        deadline = time.monotonic() + SELF_DELIVERY_WAIT
        with self._taken:
            while task_id not in self._taken_ids and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._taken.wait(remaining)

    def _on_callback_thread(self) -> None:
        self._callback_thread = threading.get_ident()

    def _mark_taken(self, task_id: int) -> None:
        """The subscribers of a delivered task were called (or it could not be): see :meth:`_wait_taken`."""
        with self._taken:
            self._taken_ids.add(task_id)
            self._taken_order.append(task_id)
            if len(self._taken_order) > 1000:
                self._taken_ids.discard(self._taken_order.popleft())
            self._taken.notify_all()

    def _direct(self) -> DirectSocket:
        """This thread's direct socket (see :class:`DirectSocket`), created at its first request."""
        direct: DirectSocket | None = getattr(self._local, 'direct', None)
        if direct is None or direct.closed:
            direct = self._local.direct = DirectSocket(self)
            self._senders.add(direct)
        return direct

    # I/O thread: what the session asks of its owner (SessionOwner) ------------------------------------------------

    def reclaim(self) -> bytes:
        return b','.join(b'%d:%d' % item for item in self._held.items())

    def on_welcome(self, resumed: bool, restarted: bool, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        for task_id in self._answers_waiting:  # claimed in the HELLO; their answers go out right after this
            self._held.pop(task_id, None)
        self._answers_waiting.clear()
        if restarted:
            # Whether a call in flight reached its recipient is unknown: fail it rather than leave it hanging.
            for correlation, future in list(self._rpc_results.items()):
                if not future.done():
                    future.set_exception(BrokerRestarted(f'the broker restarted during the call ({correlation!r})'))
            self._rpc_results.clear()
        if resumed:
            # The session's state again, in the order it was built: subscription first, as in add_rpc_subscriber.
            write = self._session.io_write
            if self._subscribed:
                write(protocol.encode(Command.SUBSCRIBE, self._correlation()))
            for identifier in self._registered_rpc:
                write(protocol.encode(Command.RPC_REGISTER, self._correlation(), identifier.encode()))
            for queue, prefetch in self._consuming.items():
                write(protocol.encode(Command.CONSUME, self._correlation(), queue.encode(), protocol.number(prefetch)))

    def on_error(self, correlation: bytes, exception: Exception) -> None:
        for table in (self._rpc_results, self._gets, self._admin_calls):
            future = table.pop(correlation, None)
            if future is not None and not future.done():
                future.set_exception(exception)
        registration = self._registrations.pop(correlation, None)
        if registration is not None:
            registration[1].set_exception(exception)

    def on_shutdown(self, closed: Exception) -> None:
        for table in (self._task_results, self._rpc_results, self._gets, self._admin_calls):
            for future in list(table.values()):  # a caller thread may add a task's result future meanwhile
                if not future.done():
                    future.set_exception(closed)
        for _, future in self._registrations.values():
            if not future.done():
                future.set_exception(closed)

    # I/O thread: requests from callers ------------------------------------------------------------------------------

    def _io_forget(self, correlation: bytes) -> None:
        """A caller stopped waiting for this request (no answer in time): it is not to go out any more."""
        self._rpc_results.pop(correlation, None)
        self._session.io_forget(correlation)

    def _io_rpc_call(
        self,
        correlation: bytes,
        frames: list[bytes],
        future: concurrent.futures.Future,
        routed: concurrent.futures.Future,
    ) -> None:
        self._rpc_results[correlation] = future
        self._session.io_expect_done(correlation, frames, routed)

    def _io_register(self, identifier: str, frame: bytes, future: concurrent.futures.Future) -> None:
        correlation = self._correlation()
        self._registrations[correlation] = (identifier, future)
        self._session.io_request(correlation, protocol.encode(Command.RPC_REGISTER, correlation, frame))

    def _io_subscribe(self, correlation: bytes, frames: list[bytes], done: concurrent.futures.Future) -> None:
        self._subscribed = True
        self._session.io_expect_done(correlation, frames, done)

    def _io_consume(self, queue: str, prefetch: int | None, done: concurrent.futures.Future) -> None:
        correlation = self._correlation()
        if prefetch is None:
            self._consuming.pop(queue, None)
            frames = protocol.encode(Command.CANCEL, correlation, queue.encode())
        else:
            self._consuming[queue] = prefetch
            frames = protocol.encode(Command.CONSUME, correlation, queue.encode(), protocol.number(prefetch))
        self._session.io_expect_done(correlation, frames, done)

    def _io_get(self, correlation: bytes, queue: str, future: concurrent.futures.Future) -> None:
        self._gets[correlation] = future
        self._session.io_request(correlation, protocol.encode(Command.TASK_GET, correlation, queue.encode()))

    def _io_task_answer(self, task_id: int, attempt: int, frames: list[bytes], final: bool) -> None:
        if final and not self._session.io_welcomed:
            # No session now: the answer goes after our next HELLO, which must still claim the task, or the broker
            # would take it back (or, restarted, requeue it after its grace) and it would run again (issue 20.2).
            self._answers_waiting.add(task_id)
        elif final:
            self._held.pop(task_id, None)
        self._session.io_send(frames)

    # I/O thread: messages from the broker --------------------------------------------------------------------------

    def _io_on_task_result(self, args: Sequence[bytes]) -> None:
        correlation = bytes(args[0])
        future = self._task_results.get(correlation)
        if future is None:
            return
        self._resolve(self._task_results, correlation, future, args[1] == protocol.FLAG_TRUE, args[2])

    def _io_on_rpc_result(self, args: Sequence[bytes]) -> None:
        correlation = bytes(args[0])
        future = self._rpc_results.get(correlation)
        if future is None:
            return
        self._resolve(self._rpc_results, correlation, future, args[1] == protocol.FLAG_TRUE, args[2])

    def _resolve(
        self,
        table: dict[bytes, concurrent.futures.Future],
        correlation: bytes,
        future: concurrent.futures.Future,
        final: bool,
        payload: bytes,
    ) -> None:
        """Apply a kiwipy response (result, exception, cancelled or pending) to the future waiting for it."""
        try:
            response = self._decoder(payload)
        except Exception as exception:
            table.pop(correlation, None)
            future.set_exception(kiwipy.RemoteException(f'undecodable response: {exception}'))
            return
        if not isinstance(response, dict):  # a peer with another codec, or a bug: fail this future, not the I/O thread
            table.pop(correlation, None)
            future.set_exception(kiwipy.RemoteException(f'unknown response {response!r}'))
            return
        if not final and PENDING_KEY in response:
            # The remote side returned a future: ours resolves to a future that the next response resolves.
            inner: kiwipy.Future = kiwipy.Future()
            table[correlation] = inner
            future.set_result(inner)
            return
        table.pop(correlation, None)
        if CANCELLED_KEY in response:
            future.cancel()
        elif EXCEPTION_KEY in response:
            future.set_exception(kiwipy.RemoteException(response[EXCEPTION_KEY]))
        elif RESULT_KEY in response:
            future.set_result(response[RESULT_KEY])
        else:
            future.set_exception(kiwipy.RemoteException(f'unknown response {response!r}'))

    def _io_on_rpc_registered(self, args: Sequence[bytes]) -> None:
        entry = self._registrations.pop(bytes(args[0]), None)
        status = bytes(args[1])
        if entry is None:
            if status != b'ok':
                LOGGER.error('an RPC identifier of this communicator was taken by another client while reconnecting')
            return
        identifier, future = entry
        if status == b'ok':
            self._registered_rpc.add(identifier)
        if not future.done():
            future.set_result(status)

    def _io_on_rpc_unroutable(self, args: Sequence[bytes]) -> None:
        correlation = bytes(args[0])
        error = kiwipy.UnroutableError(bytes(args[1]).decode(errors='replace'))
        self._session.io_fail_done(correlation, error)  # before routing: the caller's rpc_send raises it
        future = self._rpc_results.pop(correlation, None)
        if future is not None and not future.done():
            future.set_exception(error)  # after routing (the recipient went away), or a caller that did not wait

    def _io_on_task_deliver(self, args: Sequence[bytes]) -> None:
        queue, task_id, attempt, no_reply, payload = args
        self._held[protocol.to_int(task_id)] = protocol.to_int(attempt)
        incoming = ZmqIncomingTask(
            self, protocol.to_int(task_id), protocol.to_int(attempt), no_reply == protocol.FLAG_TRUE, payload
        )
        self._run_in_callback_thread(self._run_task, bytes(queue).decode(), incoming)

    def _io_on_task_got(self, args: Sequence[bytes]) -> None:
        correlation, task_id, attempt, no_reply, payload = args
        future = self._gets.pop(bytes(correlation), None)
        if not task_id:
            if future is not None:
                future.set_result(None)
            return
        incoming = ZmqIncomingTask(
            self, protocol.to_int(task_id), protocol.to_int(attempt), no_reply == protocol.FLAG_TRUE, payload
        )
        self._held[incoming.task_id] = incoming.attempt
        if future is None or future.done():
            incoming.requeue_from_io()  # the caller gave up waiting: put it back
        else:
            future.set_result(incoming)

    def _io_on_rpc_request(self, args: Sequence[bytes]) -> None:
        # On this thread, as kiwipy's RmqThreadCommunicator runs its subscribers on its loop thread: an RPC or
        # broadcast subscriber answers at once or returns a future (plumpy schedules the work on its own loop), and two
        # thread hand-overs less halve what the communicator adds to a round trip. Task subscribers, which may load a
        # process from the database, stay on the callback thread, so that heartbeats never wait for them.
        if not self._closed or self._session.draining:
            self._run_rpc(bytes(args[0]), bytes(args[1]).decode(), args[2])

    def _io_on_broadcast(self, args: Sequence[bytes]) -> None:
        # On this thread, like RPC subscribers (see above).
        if self._closed and not self._session.draining:
            return
        self._unheard.append((time.monotonic(), args[0]))
        self._unheard_bytes += len(args[0])
        self._io_deliver_unheard()

    def _io_deliver_unheard(self) -> None:
        """Hand waiting broadcasts to the subscribers, oldest first; without subscribers they wait (bounded)."""
        unheard = self._unheard
        expired = time.monotonic() - BROADCAST_TTL
        while unheard and (unheard[0][0] < expired or self._unheard_bytes > BROADCAST_HOLD_BYTES):
            self._unheard_bytes -= len(unheard.popleft()[1])
            LIMITED.info('a broadcast nobody here subscribed to in time was dropped', key='broadcast-expired')
        while unheard:
            with self._lock:
                subscribers = list(self._broadcast_subscribers.values())
            if not subscribers:
                return
            _, payload = unheard.popleft()
            self._unheard_bytes -= len(payload)
            self._run_broadcast(payload, subscribers)

    def _run_in_callback_thread(self, function: Callable[..., None], *args: Any) -> None:
        if self._closed:
            return  # closing: the broker gets held tasks back from our goodbye
        try:
            self._callbacks.submit(function, *args)
        except RuntimeError:
            return  # closed meanwhile (the executor is shut down): as above

    # Callback thread ----------------------------------------------------------------------------------------------

    def _run_task(self, queue_name: str, task: ZmqIncomingTask) -> None:
        try:
            self._call_task_subscribers(queue_name, task)
        finally:
            self._mark_taken(task.task_id)

    def _call_task_subscribers(self, queue_name: str, task: ZmqIncomingTask) -> None:
        with self._lock:
            queue = self._queues.get(queue_name)
            subscribers = list(queue._subscribers.values()) if queue is not None else []
        if not subscribers:
            # The last subscriber went while the task was on its way: it goes back as if never delivered.
            task.requeue()
            return
        try:
            body = task.body
        except Exception:
            LOGGER.exception('task %d could not be decoded: rejected', task.task_id)
            task.reject()
            return
        for subscriber in subscribers:
            try:
                result = subscriber(self, body)
            except kiwipy.TaskRejected:
                continue
            except concurrent.futures.CancelledError:
                task.requeue()
                return
            except Exception as exception:
                LOGGER.exception('exception while processing task %d', task.task_id)
                task.finish(exception_response(exception))
                return
            task.finish_with(result)
            return
        # Every subscriber refused it: back to the queue, counted and backed off.
        task.reject()

    def _run_rpc(self, call_id: bytes, identifier: str, payload: bytes) -> None:
        def answer(final: bool, response: dict) -> None:
            try:
                data = self._encode(response)
            except Exception as exception:
                data = self._encode(exception_response(exception))
            frames = protocol.encode(Command.RPC_REPLY, call_id, protocol.flag(final), data)
            if self._session.on_io_thread():
                self._session.io_send(frames)
            else:  # a future the subscriber returned, resolved on another thread
                self._call(lambda: self._session.io_send(frames))

        with self._lock:
            subscriber = self._rpc_subscribers.get(identifier)
        if subscriber is None:
            answer(True, exception_response(kiwipy.UnroutableError(f"no RPC subscriber '{identifier}' here")))
            return
        try:
            result = subscriber(self, self._decoder(payload))
        except Exception as exception:
            answer(True, exception_response(exception))
            return
        follow_future(result, answer)

    def _run_broadcast(self, payload: bytes, subscribers: list[Callable]) -> None:
        try:
            message = self._decoder(payload)
            body, sender = message['body'], message['sender']
            subject, correlation_id = message['subject'], message['correlation_id']
        except Exception:
            LIMITED.log(logging.ERROR, 'dropped an undecodable broadcast', key='broadcast-undecodable', exc_info=True)
            return
        for subscriber in subscribers:
            try:
                subscriber(self, body, sender, subject, correlation_id)
            except Exception:
                LOGGER.exception('exception in broadcast subscriber')


def _refuse_missing_socket(endpoint: str) -> None:
    """Refuse at once an ``ipc://`` endpoint with no socket file: no broker can answer there.

    (Abstract sockets, ``ipc://@name``, are refused before this by :func:`aiida_zmq.security.check_ipc_endpoint`.)
    """
    path = ipc_path(endpoint)
    if path is None:
        return
    if not os.path.exists(path):
        parent = os.path.dirname(path) or '.'
        where = 'the directory does not exist either' if not os.path.isdir(parent) else 'no broker created it'
        raise BrokerUnavailable(
            f'no broker socket at {path} ({where}): the broker is not running there. For an AiiDA profile run '
            '`verdi daemon start`; standalone run `aiida-zmq serve --data-dir DIR`; `aiida-zmq status` shows what is '
            'running.'
        )


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


def _answer_error(answer: protocol.Message) -> Exception:
    """The exception for a direct request's answer that is not the one it hoped for (``ERROR``, ``RPC_UNROUTABLE``)."""
    args = answer.args
    if answer.command is Command.RPC_UNROUTABLE:
        return kiwipy.UnroutableError(bytes(args[1]).decode(errors='replace'))
    if answer.command is Command.ERROR:
        return broker_error(bytes(args[1]), bytes(args[2]).decode(errors='replace'))
    return kiwipy.DeliveryFailed(f'unexpected answer {answer.command.name} from the broker')
