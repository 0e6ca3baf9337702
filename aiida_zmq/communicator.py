"""A :class:`kiwipy.Communicator` over the aiida-zmq protocol, thread-safe like ``RmqThreadCommunicator``.

Three kinds of thread meet in a communicator, each with a room of its own:

- callers (any thread) call the public methods here, which hand work to the I/O thread, with three exceptions: a
  task send, a broadcast and an RPC to another client. For those, each caller thread sends on a socket of its own
  (:class:`aiida_zmq.direct.DirectSocket`) and waits there for the broker's answer; the two thread hand-overs that
  saves were a third of a send's time;
- the I/O thread (:class:`aiida_zmq.session.Session`) owns the DEALER socket: it sends, receives, heartbeats,
  notices a lost or restarted broker and says HELLO again. What the broker sends is handled there by
  :class:`aiida_zmq.inbound.Inbound`, which registers the subscriptions again after a new WELCOME and runs RPC and
  broadcast subscribers (they must not wait for the broker themselves: a blocking call from them raises a clear
  error instead of a deadlock);
- the callback thread (also :class:`aiida_zmq.inbound.Inbound`) runs task subscribers one at a time, so that slow
  user code (loading a process from the database) never delays heartbeats.

What they share is the :class:`aiida_zmq.channel.Channel` (the session, the table of pending requests, the codec,
the held tasks) and the registry of subscribers (:class:`aiida_zmq.subscribers.Subscribers`). No subscriber runs on a
caller's thread.

Sends are never dropped: what the socket cannot take yet waits in order, and messages the broker has to confirm
(tasks, registrations) are sent again after a reconnection until they are.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket as stdlib_socket
import threading
from typing import Any

import kiwipy
import shortuuid

from . import protocol
from .channel import MAX_NAME_BYTES, Channel, Decoder, Encoder, NoAnswer, answer_error, encode_name
from .codec import default_codec
from .endpoints import ipc_path
from .exceptions import BrokerUnavailable, BrokerUnreachable
from .inbound import BROADCAST_HOLD_BYTES, BROADCAST_TTL, Inbound
from .protocol import Command
from .ratelimit import RateLimitedLog
from .security import CurveKeys, check_ipc_endpoint
from .subscribers import Subscribers
from .tasks import ZmqIncomingTask, ZmqTaskQueue

__all__ = ('BROADCAST_HOLD_BYTES', 'BROADCAST_TTL', 'DEFAULT_TASK_QUEUE', 'MAX_NAME_BYTES', 'ZmqCommunicator',
           'ZmqIncomingTask', 'ZmqTaskQueue', 'connect', 'encode_name')  # fmt: skip

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

DEFAULT_TASK_QUEUE = 'aiida_zmq.tasks'


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
        self.endpoint = endpoint
        self.name = name or f'{stdlib_socket.gethostname()}:{os.getpid()}'
        self._connect_timeout = connect_timeout
        # Set once here; what they hold says which thread owns its state.
        self._channel = Channel(
            endpoint,
            subscribers=Subscribers(self),
            name=self.name,
            encoder=encoder or codec.encode,
            decoder=decoder or codec.decode,
            heartbeat=heartbeat,
            broker_timeout=broker_timeout,
            confirm_timeout=confirm_timeout,
            request_timeout=request_timeout,
            max_message_bytes=max_message_bytes,
            curve=curve,
        )
        self._inbound = Inbound(self._channel, self._prefetch_of)
        # The session's thread and the direct sockets, as the tests look at them.
        self._io_thread = self._channel.session.thread
        self._senders = self._channel.senders
        # Callers': one queue object per name (guarded by the lock); the subscription made once by the first RPC or
        # broadcast subscriber (as kiwipy's RMQ communicator binds its broadcast queue when it creates its message
        # subscriber) and kept from then on.
        self._lock = threading.Lock()
        self._queues: dict[str, ZmqTaskQueue] = {}
        self._subscription: concurrent.futures.Future | None = None
        self._default_queue = self.task_queue(task_queue, prefetch_count=task_prefetch_count)

    # Lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, say HELLO and wait for the broker's WELCOME.

        :raises aiida_zmq.exceptions.UnsafePath: at once, for an ``ipc://`` socket another user controls.
        """
        check_ipc_endpoint(self.endpoint)  # before anything is sent: a fake broker there would read and "confirm" it
        _refuse_missing_socket(self.endpoint)  # known at once: no broker there
        try:
            self._channel.session.start(self._inbound, self._connect_timeout)
        except BaseException:
            self.close()
            raise

    def is_closed(self) -> bool:
        return self._channel.closed

    def in_touch(self) -> bool:
        """Whether the broker answers: welcomed, and heard from within two heartbeats (not part of kiwipy)."""
        return self._channel.session.in_touch()

    def close(self) -> None:
        if self._channel.closed:
            return
        self._inbound.close()
        self._channel.close()
        self._channel.session.close()

    # kiwipy.Communicator: RPC -------------------------------------------------------------------------------------

    def add_rpc_subscriber(self, subscriber: Any, identifier: Any = None) -> Any:
        """Register ``subscriber`` for RPCs to ``identifier``; it is reachable when this returns.

        :raises kiwipy.DuplicateSubscriberIdentifier: when this or another client of the broker holds ``identifier``.
        :raises kiwipy.TimeoutError: when the broker did not answer within ``request_timeout``.
        """
        channel = self._channel
        channel.ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        key = str(identifier)
        frame = encode_name(key, 'an RPC identifier')
        self._channel.subscribers.add_rpc(key, subscriber)
        channel.not_on_io_thread('add an RPC subscriber')
        # Subscribed to broadcasts from now on, as kiwipy's RMQ communicator binds its broadcast queue when it first
        # subscribes anything: the SUBSCRIBE goes out before the registration, so the answer to one covers both.
        self._subscribe()
        try:
            status = self._register(frame)
        except BaseException:
            self._channel.subscribers.discard_rpc(key)
            raise
        if status != b'ok':
            self._channel.subscribers.discard_rpc(key)
            raise kiwipy.DuplicateSubscriberIdentifier(
                f"RPC identifier '{identifier}' is already taken by another client of this broker"
            )
        return identifier

    def _register(self, frame: bytes) -> bytes:
        """Register an RPC identifier with the broker; return its answer, ``ok`` or why not."""
        registered: concurrent.futures.Future = concurrent.futures.Future()
        self._channel.call(lambda: self._inbound.io_register(frame, registered))
        return registered.result(self._channel.request_timeout)

    def adopt(self, subscribers: Subscribers) -> None:
        """Take ``subscribers`` as this communicator's registry, and register with the broker what it holds, returning
        once the broker answered (not part of kiwipy).

        For a registry shared with another side, as :class:`aiida_zmq.aiida.communicator.ProfileCommunicator` shares
        its registry with its offline side: subscribers added there are live here from now on, and the broker learns
        of them again whenever it welcomes this session again. Taking the same registry again registers it again.

        :raises ValueError: when this communicator has subscribers of its own.
        :raises TimeoutError: when the broker did not answer within ``request_timeout``.
        """
        channel = self._channel
        channel.ensure_open()
        channel.not_on_io_thread('take a registry of subscribers')
        if channel.subscribers is not subscribers:
            if channel.subscribers:
                raise ValueError('this communicator has subscribers of its own: it cannot take another registry')
            channel.subscribers = subscribers
        if subscribers.hears_broadcasts():
            self._subscribe().result(channel.request_timeout)
        for identifier in subscribers.rpc_identifiers():
            if self._register(identifier.encode()) != b'ok':
                LOGGER.error('RPC identifier %s, taken offline, is held by another client of the broker', identifier)
        for queue in subscribers.consumed_queues():
            channel.consume(queue, self._prefetch_of(queue))

    def remove_rpc_subscriber(self, identifier: Any) -> None:
        """Remove an RPC subscriber; once this returns the broker no longer routes calls for ``identifier`` here."""
        channel = self._channel
        channel.ensure_open()
        key = str(identifier)
        self._channel.subscribers.remove_rpc(key)
        frame = key.encode()  # checked when it was added
        correlation = channel.correlation()
        done = channel.request_done(correlation, protocol.encode(Command.RPC_UNREGISTER, correlation, frame))
        # Not answered in time (the broker is restarting): gone here already; the broker learns it when it is back.
        channel.wait_done(done, channel.request_timeout)

    def rpc_send(self, recipient_id: Any, msg: Any) -> kiwipy.Future:
        """Send an RPC; returns once the broker handed it to its recipient, with a future of the answer.

        :raises kiwipy.UnroutableError: at once when no client holds ``recipient_id`` (as ``RmqThreadCommunicator``
            raises from the call, which aiida-core's ``Process.kill`` relies on); :class:`BrokerUnreachable` (also an
            ``UnroutableError``) when the broker did not answer within ``broker_timeout``. Called from an RPC or
            broadcast subscriber (on the I/O thread, which brings the answer), it cannot wait: then the future fails
            with ``UnroutableError`` instead.
        """
        channel = self._channel
        channel.ensure_open()
        identifier = encode_name(str(recipient_id), 'an RPC recipient')
        payload = channel.encode(msg)
        future: kiwipy.Future = kiwipy.Future()
        correlation = channel.correlation()
        unreachable = BrokerUnreachable(
            f'the broker at {self.endpoint} did not route the RPC to {recipient_id!r} within '
            f'{channel.broker_timeout:.0f}s (is it running? `aiida-zmq status`): it was not sent'
        )
        if self._channel.subscribers.rpc(str(recipient_id)) is not None or channel.on_io_thread():
            # Through the session: to one's own subscriber the request comes on the session ahead of the answer, so it
            # is handled when this returns; on the I/O thread nothing can wait.
            routed: concurrent.futures.Future = concurrent.futures.Future()
            frames = protocol.encode(Command.RPC_CALL, correlation, identifier, payload)
            channel.pending.add(correlation, Command.RPC_RESULT, future)
            channel.call(lambda: channel.session.io_expect_done(correlation, frames, routed))
            if not channel.wait_done(routed, channel.broker_timeout):
                channel.forget(correlation)
                raise unreachable
            return future
        # To another client: on this thread's own socket, the reply to the session (known before the send).
        frames = protocol.encode(Command.RPC_SUBMIT, correlation, channel.session.secret, identifier, payload)
        channel.pending.add(correlation, Command.RPC_RESULT, future)
        try:
            answer = channel.direct(correlation, frames, channel.broker_timeout)
            if answer.command is not Command.DONE:
                raise answer_error(answer)
        except NoAnswer:
            channel.pending.forget(correlation)
            raise unreachable from None
        except BaseException:
            channel.pending.forget(correlation)
            raise
        return future

    # kiwipy.Communicator: tasks -----------------------------------------------------------------------------------

    def add_task_subscriber(self, subscriber: Any, identifier: Any = None) -> Any:
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
        self._channel.ensure_open()
        encode_name(queue_name, 'a task queue name')
        with self._lock:
            queue = self._queues.get(queue_name)
            if queue is None:
                queue = ZmqTaskQueue(self._channel, queue_name, prefetch_count or 0)
                self._queues[queue_name] = queue
            elif prefetch_count is not None:
                queue.prefetch_count = prefetch_count
            return queue

    def _prefetch_of(self, queue_name: str) -> int:
        with self._lock:
            queue = self._queues.get(queue_name)
        return queue.prefetch_count if queue is not None else 0

    # kiwipy.Communicator: broadcasts ------------------------------------------------------------------------------

    def add_broadcast_subscriber(self, subscriber: Any, identifier: Any = None) -> Any:
        """Add a broadcast subscriber; broadcasts the broker takes after this returns reach it.

        Broadcasts that reached this communicator since its first subscriber (of any kind), while it had no
        broadcast subscriber, and at most ``BROADCAST_TTL`` seconds ago, are handed to it first: RabbitMQ keeps them
        in the communicator's broadcast queue for as long.

        :raises kiwipy.TimeoutError: when the broker did not confirm the subscription within ``request_timeout``.
        """
        channel = self._channel
        channel.ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        self._channel.subscribers.add_broadcast(identifier, subscriber)
        subscription = self._subscribe()
        if not channel.on_io_thread():
            try:
                subscription.result(channel.request_timeout)
            except BaseException:
                self._channel.subscribers.discard_broadcast(identifier)
                raise
        channel.call(self._inbound.io_deliver_unheard)
        return identifier

    def remove_broadcast_subscriber(self, identifier: Any) -> None:
        """Remove a broadcast subscriber: it gets nothing once this returns (the session stays subscribed)."""
        self._channel.ensure_open()
        self._channel.subscribers.remove_broadcast(identifier)

    def broadcast_send(self, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None) -> bool:
        """Send a broadcast; returns ``True`` once the broker has it (it sends it to every subscriber in the same turn).

        ``False`` when the broker did not answer within ``broker_timeout`` (it is down or restarting; the broadcast
        goes out when it is back), as ``RmqThreadCommunicator`` answers ``False`` for a publish RabbitMQ did not ack.
        From an RPC or broadcast subscriber (the I/O thread) it cannot wait: ``True`` once queued.
        """
        channel = self._channel
        channel.ensure_open()
        message = {'body': body, 'sender': sender, 'subject': subject, 'correlation_id': correlation_id}
        payload = channel.encode(message)
        correlation = channel.correlation()
        frames = protocol.encode(Command.PUBLISH, correlation, payload)
        if channel.on_io_thread():
            channel.request_done(correlation, frames)  # through the session, not waited for
            return True
        try:
            answer = channel.direct(correlation, frames, channel.broker_timeout)
        except NoAnswer:
            LIMITED.warning(
                'the broker at %s did not take a broadcast within %.0fs: it goes out once the broker is back',
                self.endpoint,
                channel.broker_timeout,
                key='publish-timeout',
            )
            return False
        if answer.command is not Command.DONE:
            raise answer_error(answer)
        return True

    def _subscribe(self) -> concurrent.futures.Future:
        """This session's broadcast subscription: asked for once (the first call), in force when the future is done."""
        with self._lock:
            subscription = self._subscription
            if subscription is None or (subscription.done() and subscription.exception() is not None):
                done = subscription = self._subscription = concurrent.futures.Future()
                correlation = self._channel.correlation()
                frames = protocol.encode(Command.SUBSCRIBE, correlation)
                self._channel.call(lambda: self._inbound.io_subscribe(correlation, frames, done))
            return subscription

    # Administration (not part of kiwipy) ---------------------------------------------------------------------------

    def admin(self, op: str, timeout: float | None = None, **arguments: Any) -> dict[str, Any]:
        """Ask the broker an administrative question (see ``docs/protocol.md``, ADMIN) and return its answer.

        :param op: ``status``, ``peer-gone`` (``pid=``), ``dead-letters`` (``queue=``), ``dead-letters-requeue``
            (``ids=``), ``dead-letters-drop`` (``ids=``), ``tasks`` (``queue=``, ``limit=``).
        :raises AdminError: when the broker refuses the request.
        """
        channel = self._channel
        channel.ensure_open()
        channel.not_on_io_thread(f'ask the broker `{op}`')
        request = json.dumps({'op': op, **arguments}).encode()
        correlation = channel.correlation()
        future: concurrent.futures.Future = concurrent.futures.Future()
        frames = protocol.encode(Command.ADMIN, correlation, request)

        def send() -> None:
            channel.pending.add(correlation, Command.ADMIN_REPLY, future)
            channel.session.io_request(correlation, frames)

        channel.call(send)
        try:
            return future.result(channel.request_timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            channel.forget(correlation)
            raise TimeoutError(f'the broker at {self.endpoint} did not answer `{op}` in time') from None


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
