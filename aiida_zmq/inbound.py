"""What the broker sends a client, handled on the thread it must be: the I/O thread, or the callback thread for tasks.

:class:`Inbound` is the session's owner (:class:`aiida_zmq.session.SessionOwner`). On the I/O thread it resolves the
futures of answered requests (:class:`aiida_zmq.pending.Pending`), runs RPC and broadcast subscribers (as kiwipy's
RMQ communicator runs them on its event-loop thread: they answer at once or return a future, and running them here
saves two thread hand-overs per call; they must not wait for the broker themselves), keeps broadcasts that came while
nobody here listened, and tells a broker that welcomed the session again what the registry holds. Task subscribers run
on the callback thread, one at a time, so that slow user code (loading a process from the database) never delays
heartbeats.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import kiwipy
from kiwipy.rmq.utils import exception_response

from . import protocol
from .channel import Channel
from .exceptions import AdminError, BrokerRestarted
from .protocol import Command
from .ratelimit import RateLimitedLog
from .replies import follow_future, settle
from .tasks import ZmqIncomingTask

__all__ = ('BROADCAST_HOLD_BYTES', 'BROADCAST_TTL', 'Inbound')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

#: How long a broadcast that arrived while this communicator had no broadcast subscriber waits for one: kiwipy's
#: ``MESSAGE_TTL`` on the broadcast queue RabbitMQ keeps for a communicator (seconds).
BROADCAST_TTL = 66.0
#: At most this many bytes of such broadcasts are kept; the oldest go first.
BROADCAST_HOLD_BYTES = 16 * 1024 * 1024

Future = concurrent.futures.Future


class Inbound:
    """See the module docstring.

    :param prefetch: the prefetch count of a queue, for the ``CONSUME`` that registers it again.
    """

    def __init__(self, channel: Channel, prefetch: Callable[[str], int]) -> None:
        self._channel = channel
        self._session = channel.session
        self._pending = channel.pending
        self._prefetch = prefetch
        # The I/O thread's.
        self._unheard: collections.deque[tuple[float, bytes]] = collections.deque()  # broadcasts with no subscriber
        self._unheard_bytes = 0
        # The session asked for broadcasts (the first RPC or broadcast subscriber did): asked again at each WELCOME
        # from then on, as kiwipy's RMQ communicator keeps its broadcast queue.
        self._subscribed = False
        #: What the broker sends and the session passes on (SessionOwner.handlers), handled on the I/O thread.
        self.handlers: Mapping[Command, Callable[[Sequence[bytes]], None]] = {
            Command.TASK_DELIVER: self._io_on_task_deliver,
            Command.TASK_RESULT: lambda args: self._io_on_result(Command.TASK_RESULT, args),
            Command.TASK_GOT: self._io_on_task_got,
            Command.RPC_REGISTERED: self._io_on_rpc_registered,
            Command.RPC_REQUEST: self._io_on_rpc_request,
            Command.RPC_RESULT: lambda args: self._io_on_result(Command.RPC_RESULT, args),
            Command.RPC_UNROUTABLE: self._io_on_rpc_unroutable,
            Command.BROADCAST: self._io_on_broadcast,
            Command.ADMIN_REPLY: self._io_on_admin_reply,
        }
        # The callback thread: task subscribers, one at a time.
        self._callbacks = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='aiida-zmq-callback', initializer=self._on_callback_thread
        )

    def close(self) -> None:
        """Start no more task subscribers (held tasks go back with the session's goodbye)."""
        self._callbacks.shutdown(wait=False, cancel_futures=True)

    # What the session asks of its owner (SessionOwner), on the I/O thread --------------------------------------------

    def reclaim(self) -> bytes:
        return b','.join(b'%d:%d' % item for item in self._channel.held.items())

    def on_welcome(self, resumed: bool, restarted: bool, max_message_bytes: int) -> None:
        channel = self._channel
        channel.max_message_bytes = max_message_bytes
        for task_id in channel.answers_waiting:  # claimed in the HELLO; their answers go out right after this
            channel.held.pop(task_id, None)
        channel.answers_waiting.clear()
        if restarted:
            # Whether a call in flight reached its recipient is unknown: fail it rather than leave it hanging.
            self._pending.fail_all(
                lambda correlation: BrokerRestarted(f'the broker restarted during the call ({correlation!r})'),
                Command.RPC_RESULT,
            )
        if resumed:
            self.io_register_all()

    def io_register_all(self) -> None:
        """Tell the broker what the registry holds, in the order it was built: the subscription first (as in
        ``add_rpc_subscriber``), then the RPC identifiers, then the queues consumed. The answers are not waited for
        (an identifier another client took meanwhile is logged)."""
        channel, send = self._channel, self._session.io_send
        if self._subscribed or channel.subscribers.hears_broadcasts():
            self._subscribed = True
            send(protocol.encode(Command.SUBSCRIBE, channel.correlation()))
        for identifier in channel.subscribers.rpc_identifiers():
            send(protocol.encode(Command.RPC_REGISTER, channel.correlation(), identifier.encode()))
        for queue in channel.subscribers.consumed_queues():
            prefetch = protocol.number(self._prefetch(queue))
            send(protocol.encode(Command.CONSUME, channel.correlation(), queue.encode(), prefetch))

    # Requests from callers, on the I/O thread -------------------------------------------------------------------------

    def io_subscribe(self, correlation: bytes, frames: list[bytes], done: Future) -> None:
        self._subscribed = True
        self._session.io_expect_done(correlation, frames, done)

    def io_register(self, frame: bytes, future: Future) -> None:
        correlation = self._channel.correlation()
        self._pending.add(correlation, Command.RPC_REGISTERED, future)
        self._session.io_request(correlation, protocol.encode(Command.RPC_REGISTER, correlation, frame))

    # Messages from the broker, on the I/O thread ----------------------------------------------------------------------

    def _io_on_result(self, answer: Command, args: Sequence[bytes]) -> None:
        correlation = bytes(args[0])
        future = self._pending.pop(correlation, answer)
        if future is None:
            return
        inner = settle(future, args[2], args[1] == protocol.FLAG_TRUE, self._channel.decode)
        if inner is not None:  # the remote side answered with a future: the next response resolves it
            self._pending.add(correlation, answer, inner)

    def _io_on_rpc_registered(self, args: Sequence[bytes]) -> None:
        future = self._pending.pop(bytes(args[0]), Command.RPC_REGISTERED)
        status = bytes(args[1])
        if future is None:
            if status != b'ok':
                LOGGER.error('an RPC identifier of this communicator was taken by another client while reconnecting')
            return
        if not future.done():
            future.set_result(status)

    def _io_on_rpc_unroutable(self, args: Sequence[bytes]) -> None:
        # Before routing, the caller's rpc_send raises it (its DONE fails); after routing (the recipient went away),
        # or for a caller that did not wait, the result's future fails.
        self._pending.fail(bytes(args[0]), kiwipy.UnroutableError(bytes(args[1]).decode(errors='replace')))

    def _io_on_task_deliver(self, args: Sequence[bytes]) -> None:
        queue, task_id, attempt, no_reply, payload = args
        incoming = ZmqIncomingTask(
            self._channel, protocol.to_int(task_id), protocol.to_int(attempt), no_reply == protocol.FLAG_TRUE, payload
        )
        self._channel.held[incoming.task_id] = incoming.attempt
        if self._channel.closed:
            return  # closing: the broker gets held tasks back from our goodbye
        try:
            self._callbacks.submit(self._run_task, bytes(queue).decode(), incoming)
        except RuntimeError:
            return  # closed meanwhile (the executor is shut down): as above

    def _io_on_task_got(self, args: Sequence[bytes]) -> None:
        correlation, task_id, attempt, no_reply, payload = args
        future = self._pending.pop(bytes(correlation), Command.TASK_GOT)
        if not task_id:
            if future is not None and not future.done():
                future.set_result(None)
            return
        incoming = ZmqIncomingTask(
            self._channel, protocol.to_int(task_id), protocol.to_int(attempt), no_reply == protocol.FLAG_TRUE, payload
        )
        self._channel.held[incoming.task_id] = incoming.attempt
        if future is None or future.done():
            incoming.requeue_from_io()  # the caller gave up waiting: put it back
        else:
            future.set_result(incoming)

    def _io_on_rpc_request(self, args: Sequence[bytes]) -> None:
        if not self._channel.closed or self._session.draining:
            self._run_rpc(bytes(args[0]), bytes(args[1]).decode(), args[2])

    def _io_on_broadcast(self, args: Sequence[bytes]) -> None:
        if self._channel.closed and not self._session.draining:
            return
        self._unheard.append((time.monotonic(), args[0]))
        self._unheard_bytes += len(args[0])
        self.io_deliver_unheard()

    def io_deliver_unheard(self) -> None:
        """Hand waiting broadcasts to the subscribers, oldest first; without subscribers they wait (bounded)."""
        unheard = self._unheard
        expired = time.monotonic() - BROADCAST_TTL
        while unheard and (unheard[0][0] < expired or self._unheard_bytes > BROADCAST_HOLD_BYTES):
            self._unheard_bytes -= len(unheard.popleft()[1])
            LIMITED.info('a broadcast nobody here subscribed to in time was dropped', key='broadcast-expired')
        while unheard:
            subscribers = self._channel.subscribers.broadcast_subscribers()
            if not subscribers:
                return
            _, payload = unheard.popleft()
            self._unheard_bytes -= len(payload)
            self._run_broadcast(payload, subscribers)

    def _io_on_admin_reply(self, args: Sequence[bytes]) -> None:
        correlation, status, response = bytes(args[0]), bytes(args[1]), bytes(args[2])
        future = self._pending.pop(correlation, Command.ADMIN_REPLY)
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

    def _run_rpc(self, call_id: bytes, identifier: str, payload: bytes) -> None:
        channel, session = self._channel, self._session

        def answer(final: bool, response: dict) -> None:
            try:
                data = channel.encode(response)
            except Exception as exception:
                data = channel.encode(exception_response(exception))
            frames = protocol.encode(Command.RPC_REPLY, call_id, protocol.flag(final), data)
            if session.on_io_thread():
                session.io_send(frames)
            else:  # a future the subscriber returned, resolved on another thread
                session.call(lambda: session.io_send(frames))

        subscriber = self._channel.subscribers.rpc(identifier)
        if subscriber is None:
            answer(True, exception_response(kiwipy.UnroutableError(f"no RPC subscriber '{identifier}' here")))
            return
        try:
            result = subscriber(self._channel.subscribers.communicator, channel.decode(payload))
        except Exception as exception:
            answer(True, exception_response(exception))
            return
        follow_future(result, answer)

    def _run_broadcast(self, payload: bytes, subscribers: list[Callable]) -> None:
        try:
            message = self._channel.decode(payload)
            body, sender = message['body'], message['sender']
            subject, correlation_id = message['subject'], message['correlation_id']
        except Exception:
            LIMITED.log(logging.ERROR, 'dropped an undecodable broadcast', key='broadcast-undecodable', exc_info=True)
            return
        communicator = self._channel.subscribers.communicator
        for subscriber in subscribers:
            try:
                subscriber(communicator, body, sender, subject, correlation_id)
            except Exception:
                LOGGER.exception('exception in broadcast subscriber')

    # The callback thread ----------------------------------------------------------------------------------------------

    def _on_callback_thread(self) -> None:
        self._channel.taken.callback_thread = threading.get_ident()

    def _run_task(self, queue_name: str, task: ZmqIncomingTask) -> None:
        try:
            self._call_task_subscribers(queue_name, task)
        finally:
            self._channel.taken.mark(task.task_id)

    def _call_task_subscribers(self, queue_name: str, task: ZmqIncomingTask) -> None:
        subscribers = self._channel.subscribers.task_subscribers(queue_name)
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
        communicator = self._channel.subscribers.communicator
        for subscriber in subscribers:
            try:
                result = subscriber(communicator, body)
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
