"""A client's session with the broker: its socket, its I/O thread, and the Paranoid Pirate part of the protocol.

:class:`Session` owns the communicator's DEALER socket and the one thread that uses it. It says ``HELLO`` and waits
for ``WELCOME``, heartbeats both ways, notices a silent or restarted broker and says ``HELLO`` again, keeps what
cannot be sent yet in order (never dropping it), and sends a request again when the broker answers that it has no
session for it. It keeps the client's table of requests waiting for an answer (:attr:`Session.pending`): it resolves
those waiting for ``DONE``, fails those an ``ERROR`` answers, and fails them all when it ends. What the other messages
mean is its owner's business (:class:`aiida_zmq.inbound.Inbound`): every command but the session's own goes to the
owner's handler for it, on this thread, and the owner registers its subscriptions again when told that the session
was welcomed again.

Callers hand work to the thread with :meth:`Session.call`; everything named ``io_*`` runs on the thread only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import typing as t
from collections.abc import Callable, Mapping, Sequence

import kiwipy
import zmq
import zmq.utils.monitor

from . import protocol
from .exceptions import BrokerUnavailable, MessageTooLarge, TaskNotAccepted
from .pending import Pending
from .protocol import Command, ErrorCode
from .ratelimit import RateLimitedLog
from .security import CurveKeys

__all__ = ('Session', 'SessionOwner', 'broker_error')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

#: Answers that close a request kept for resending: their first frame is the request's correlation.
ANSWERS = protocol.ANSWERS  # what answers a request (derived from protocol.SPECS)

_CONNECT_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)

_START_HINT = (
    'For an AiiDA profile run `verdi daemon start`; standalone run `aiida-zmq serve --data-dir DIR`; `aiida-zmq '
    'status` shows what is running.'
)


class SessionOwner(t.Protocol):
    """What a :class:`Session` asks of its owner, always on the session's thread."""

    #: The owner's handler of each command the broker sends, but the session's own (WELCOME, HEARTBEAT, DONE).
    handlers: Mapping[Command, Callable[[Sequence[bytes]], None]]

    def reclaim(self) -> bytes:
        """The tasks the owner holds, ``id:attempt,...``, for a ``HELLO``."""

    def on_welcome(self, resumed: bool, restarted: bool, max_message_bytes: int) -> None:
        """Welcomed (again, when ``resumed``; by a new broker, when ``restarted``): re-register what the session had."""


class Session:
    """The session socket and its I/O thread; see the module docstring."""

    def __init__(
        self,
        endpoint: str,
        *,
        routing_id: bytes,
        name: str,
        heartbeat: float,
        broker_timeout: float,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._owner: SessionOwner | None = None  # given to start(); then used by the I/O thread only
        self._routing_id = routing_id
        self._name = name
        self._heartbeat = heartbeat
        self._broker_timeout = broker_timeout
        self._curve = curve
        self.context: zmq.Context = zmq.Context.instance()

        # The I/O thread's (the socket is set by start() before the thread runs). Callers only read _welcomed and
        # _last_heard (in_touch(), racily but harmlessly) and welcomes (each direct socket, to see a new WELCOME).
        self._socket: zmq.Socket | None = None
        self._outbound: collections.deque[list[bytes]] = collections.deque()
        self._waiting_welcome: list[list[bytes]] = []  # sent while there is no session; flushed after WELCOME
        self._welcomed = False
        self._epoch: str | None = None
        self.welcomes = 0  # WELCOMEs so far; a direct socket sends again what a broker may have lost when it changes
        # The secret the broker handed this session in its first WELCOME; said again in every HELLO (after a broker
        # restart too), it proves that this session is the one that holds its tasks and gets its results. Written by
        # the I/O thread; read by caller threads for TASK_SUBMIT / RPC_SUBMIT, once start() returned (it is set then).
        self.secret = b''
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._last_hello = 0.0
        # Frames of requests until their first answer (see ANSWERS), to send them again after a HELLO when the broker
        # answers that it had no session for us (it declared us dead, or restarted).
        self._requests: dict[bytes, list[bytes]] = {}
        #: The client's requests waiting for an answer: callers and this thread (its own lock).
        self.pending = Pending()
        self.draining = False  # closing: messages that already arrived are still handled
        self._closed_on_io_thread = False

        # Hand-over from callers to the I/O thread: the deque is thread-safe, and _wake_pending, set by callers and
        # cleared by the I/O thread before it empties the deque, at worst costs one wake-up too many (see call()).
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._wake_pending = False
        self._stopping = False
        self.thread = threading.Thread(target=self._io_loop, name='aiida-zmq-io', daemon=True)
        self._ready = threading.Event()
        self._own_handlers: dict[Command, Callable[[Sequence[bytes]], None]] = {
            Command.WELCOME: self._io_on_welcome,
            Command.HEARTBEAT: self._io_on_heartbeat,
            Command.DONE: self._io_on_done,
            Command.ERROR: self._io_on_error,
        }

    # From any thread ----------------------------------------------------------------------------------------------

    def start(self, owner: SessionOwner, connect_timeout: float) -> None:
        """Connect, say HELLO and wait for the broker's WELCOME; ``owner`` handles what the broker sends.

        :raises BrokerUnavailable: at once when the connection or its handshake is refused, else when no WELCOME
            came within ``connect_timeout`` seconds.
        """
        deadline = time.monotonic() + connect_timeout
        socket = connect_socket(self.context, self.endpoint, self._routing_id, self._curve, deadline)
        self._socket = socket
        self._owner = owner
        self.thread.start()
        if not self._ready.wait(max(deadline - time.monotonic(), 0.0)):
            raise BrokerUnavailable(
                f'no aiida-zmq broker answered at {self.endpoint} within {connect_timeout:.0f}s. Is it running? '
                + _START_HINT
            )

    def call(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the I/O thread, in order with every other call."""
        self._calls.append(function)
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b'x')

    def on_io_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def in_touch(self) -> bool:
        """Whether the broker answers: welcomed, and heard from within two heartbeats."""
        return self._welcomed and time.monotonic() - self._last_heard < 2 * self._heartbeat + 0.5

    def close(self) -> None:
        """Say goodbye, once what already arrived is handled, and end the thread (waiting for it, unless on it)."""
        if self.on_io_thread():
            # Closed from an RPC or broadcast subscriber: goodbye after this message (and its answer), then the loop
            # ends and closes the pipe itself.
            self._closed_on_io_thread = True
            self.call(self._io_say_goodbye)
            return
        if self.thread.is_alive():
            self.call(self._io_say_goodbye)
            self.thread.join(10)
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        if self._wake_read >= 0:
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1

    # I/O thread: the loop -----------------------------------------------------------------------------------------

    def _io_loop(self) -> None:
        socket = self._socket
        assert socket is not None
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        polling_out = False
        self._io_hello()
        try:
            while not self._stopping:
                want_out = bool(self._outbound)
                if want_out != polling_out:
                    poller.modify(socket, zmq.POLLIN | (zmq.POLLOUT if want_out else 0))
                    polling_out = want_out
                events = dict(poller.poll(int(self._heartbeat * 500)))
                if self._wake_read in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                self._wake_pending = False
                calls = self._calls
                while calls:
                    call = calls.popleft()
                    try:
                        call()
                    except Exception:
                        # Nothing a caller passes may stop this thread: every caller would hang.
                        LIMITED.log(logging.ERROR, 'a call on the I/O thread failed', key='io-call', exc_info=True)
                if socket in events:
                    for _ in range(1000):
                        try:
                            frames = socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.io_receive(frames)
                if self._outbound:
                    self._io_flush()
                self._io_timers(time.monotonic())
        except Exception:
            LOGGER.exception('the aiida-zmq I/O thread failed; the communicator stops working')
            raise
        finally:
            self._io_shutdown()

    def _io_timers(self, now: float) -> None:
        if self._welcomed and now - self._last_heard > self._broker_timeout:
            LOGGER.warning(
                'broker at %s silent for %.1fs: reconnecting and re-registering', self.endpoint, now - self._last_heard
            )
            self._welcomed = False
        if not self._welcomed and now - self._last_hello > max(self._heartbeat, 0.5):
            self._io_hello()
        elif self._welcomed and now - self._last_sent >= self._heartbeat:
            self.io_write(protocol.encode(Command.HEARTBEAT))

    def _io_say_goodbye(self) -> None:
        self._io_drain()
        if self._welcomed:
            self.io_write(protocol.encode(Command.BYE))
        self._stopping = True

    def _io_drain(self, limit: int = 10_000) -> None:
        """Handle what already arrived before closing, as kiwipy's RMQ communicator still handles a message it was
        delivered before ``close()``: an RPC request or a broadcast sent just before is not lost. (The owner starts no
        task then: the goodbye gives held tasks back.)"""
        assert self._socket is not None
        self.draining = True
        try:
            for _ in range(limit):
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                self.io_receive(frames)
        finally:
            self.draining = False

    def _io_shutdown(self) -> None:
        self._stopping = True
        self.pending.fail_all(kiwipy.CommunicatorClosed('the communicator was closed'))
        if self._socket is not None:
            self._io_flush()
            self._socket.close()  # LINGER lets the goodbye and last acknowledgements go out
            self._socket = None
        if self._closed_on_io_thread:
            self._close_wake_pipe()  # closed from a subscriber on this thread: nobody joins it to close the pipe

    # I/O thread: sending ------------------------------------------------------------------------------------------

    def io_write(self, frames: list[bytes]) -> None:
        """Send now if the socket takes it, else queue in order; never blocks, never drops."""
        self._last_sent = time.monotonic()
        if self._outbound:
            self._outbound.append(frames)
            return
        assert self._socket is not None
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self._outbound.append(frames)

    def _io_flush(self) -> None:
        assert self._socket is not None
        while self._outbound:
            try:
                self._socket.send_multipart(self._outbound[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self._outbound.popleft()

    @property
    def io_welcomed(self) -> bool:
        """Whether :meth:`io_send` sends now; else what it is given goes after the next WELCOME (after our HELLO)."""
        return self._welcomed

    def io_send(self, frames: list[bytes]) -> None:
        """Send a message that needs a session: held back until the broker has welcomed us."""
        if self._welcomed:
            self.io_write(frames)
        else:
            self._waiting_welcome.append(frames)

    def io_request(self, correlation: bytes, frames: list[bytes]) -> None:
        """Send a request that expects an answer (see :data:`ANSWERS`), keeping its frames until then."""
        self._requests[correlation] = frames
        self.io_send(frames)

    def io_expect_done(self, correlation: bytes, frames: list[bytes], done: concurrent.futures.Future) -> None:
        """Send a request the broker answers ``DONE``: ``done`` resolves then, or fails with the broker's error."""
        self.pending.add(correlation, Command.DONE, done)
        self.io_request(correlation, frames)

    def io_forget(self, correlation: bytes) -> None:
        """A caller stopped waiting for this request (no answer in time): it is not to go out any more."""
        self.pending.forget(correlation)
        frames = self._requests.pop(correlation, None)
        if frames is not None:
            self._waiting_welcome = [waiting for waiting in self._waiting_welcome if waiting is not frames]

    def _io_hello(self) -> None:
        self._last_hello = time.monotonic()
        self.io_write(
            protocol.encode(
                Command.HELLO,
                self._name.encode(),
                protocol.number(int(self._heartbeat * 1000)),
                self._io_owner().reclaim(),
                protocol.number(os.getpid()),
                self.secret,
            )
        )

    # I/O thread: receiving ----------------------------------------------------------------------------------------

    def io_receive(self, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except protocol.VersionMismatch as exception:
            LIMITED.error('%s', exception, key='version')
            return
        except protocol.ProtocolError as exception:
            LIMITED.warning('dropped a malformed message from the broker: %s', exception, key='malformed')
            return
        self._last_heard = time.monotonic()
        command, args = message.command, message.args
        handler = self._own_handlers.get(command) or self._io_owner().handlers.get(command)
        if handler is None:
            LIMITED.warning('dropped %s: the broker does not send it', command.name, key=('unexpected', command))
            return
        if command in ANSWERS and args:
            frames_sent = self._requests.pop(bytes(args[0]), None)
            if frames_sent is not None and command is Command.ERROR and bytes(args[1]) == ErrorCode.UNKNOWN_CLIENT:
                # The broker dropped this request because it had no session for us: send it again after WELCOME.
                self._waiting_welcome.append(frames_sent)
        try:
            handler(args)
        except (protocol.ProtocolError, UnicodeDecodeError) as exception:
            # A malformed message must not kill the I/O thread (every caller would hang): log it and drop it.
            LIMITED.warning(
                'dropped a malformed %s from the broker: %s', command.name, exception, key=('malformed', command)
            )
        except Exception:
            LIMITED.log(logging.ERROR, 'handling %s failed', command.name, key=('handler', command), exc_info=True)

    def _io_on_welcome(self, args: Sequence[bytes]) -> None:
        epoch = bytes(args[0]).decode()
        max_message_bytes = protocol.to_int(args[2])
        if max_message_bytes <= 0:  # would refuse every send from now on
            raise protocol.ProtocolError(f'WELCOME with max_message_bytes {max_message_bytes}')
        secret = bytes(args[3])
        if not secret or (self.secret and secret != self.secret):
            raise protocol.ProtocolError('WELCOME without the secret this session said in its HELLO')
        self.secret = secret
        restarted = self._epoch is not None and epoch != self._epoch
        resumed = self._epoch is not None
        self._epoch = epoch
        self._welcomed = True
        self.welcomes += 1
        if resumed:
            LOGGER.info(
                '%s broker at %s: re-registering', 'restarted' if restarted else 'back in touch with', self.endpoint
            )
        self._io_owner().on_welcome(resumed, restarted, max_message_bytes)
        waiting, self._waiting_welcome = self._waiting_welcome, []
        for frames in waiting:
            self.io_write(frames)
        self._ready.set()

    def _io_on_heartbeat(self, args: Sequence[bytes]) -> None:
        pass  # every message counts as a sign of life (_last_heard)

    def _io_on_done(self, args: Sequence[bytes]) -> None:
        done = self.pending.pop(bytes(args[0]), Command.DONE)
        if done is not None and not done.done():
            done.set_result(None)

    def _io_owner(self) -> SessionOwner:
        assert self._owner is not None, 'the I/O thread runs only once started'
        return self._owner

    def _io_on_error(self, args: Sequence[bytes]) -> None:
        correlation, code, text_bytes = bytes(args[0]), bytes(args[1]), bytes(args[2])
        text = text_bytes.decode(errors='replace')
        if code == ErrorCode.UNKNOWN_CLIENT:
            if self._welcomed:
                LOGGER.warning('broker at %s has no session for us (it restarted?): saying HELLO again', self.endpoint)
                self._welcomed = False
                self._io_hello()
            return
        if code == ErrorCode.VERSION:
            LIMITED.error('broker at %s refused this client: %s', self.endpoint, text, key='version')
            return
        exception = broker_error(code, text)
        LIMITED.warning('broker error %s: %s', code.decode(errors='replace'), text, key=('error', code))
        self.pending.fail(correlation, exception)  # every future waiting for an answer to it


def broker_error(code: bytes, text: str) -> Exception:
    """The exception a caller gets for the broker's ``ERROR`` answer to its request."""
    if code == ErrorCode.TOO_LARGE:
        return MessageTooLarge(text)
    if code == ErrorCode.STORE:
        return TaskNotAccepted(f'the broker could not store the task: {text}')
    return kiwipy.DeliveryFailed(f'{code.decode(errors="replace")}: {text}')


def connect_socket(
    context: zmq.Context, endpoint: str, routing_id: bytes, curve: CurveKeys | None, deadline: float
) -> zmq.Socket:
    """A session's DEALER socket, connected, once ZeroMQ's handshake with the broker succeeded (or ``deadline``
    passed: the WELCOME wait reports that).

    A refused connection (nothing listens there) or a refused CURVE key is known within milliseconds: waiting for a
    WELCOME that cannot come would only hide it.

    :raises BrokerUnavailable: at once when the connection or its handshake is refused.
    """
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.ROUTING_ID, routing_id)
    socket.setsockopt(zmq.LINGER, 2000)  # close() waits this long for a goodbye and last answers to go out
    socket.setsockopt(zmq.SNDHWM, 100_000)
    socket.setsockopt(zmq.RCVHWM, 100_000)
    socket.setsockopt(zmq.RECONNECT_IVL, 100)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if curve is not None:
        curve.apply(socket)
    try:
        monitor = socket.get_monitor_socket(_CONNECT_EVENTS)
        try:
            socket.connect(endpoint)
            _await_handshake(monitor, endpoint, deadline)
        finally:
            socket.disable_monitor()
            monitor.close(0)
    except zmq.ZMQError as exception:
        socket.close(0)
        raise ValueError(f'cannot connect to {endpoint!r}: {exception}') from exception
    except BaseException:
        socket.close(0)
        raise
    return socket


def _await_handshake(monitor: zmq.Socket, endpoint: str, deadline: float) -> None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not monitor.poll(int(remaining * 1000) + 1):
            return  # no verdict in time: the WELCOME wait reports it
        event = zmq.utils.monitor.recv_monitor_message(monitor)['event']
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        if event == zmq.EVENT_CONNECT_RETRIED:
            raise BrokerUnavailable(
                f'nothing listens at {endpoint} (connection refused): the broker is not running there. ' + _START_HINT
            )
        if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            raise BrokerUnavailable(
                f'the broker at {endpoint} refused the connection handshake (a CURVE key it does not know, or '
                'not an aiida-zmq broker): check the client keys (`aiida_zmq.security.client_keys`) and the '
                'endpoint.'
            )
