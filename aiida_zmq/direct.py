"""A caller thread's own socket for the requests that need no session (task sends, broadcasts, RPCs to others).

See :class:`DirectSocket` for why, and ``docs/design.md`` ("A caller thread sends its tasks, broadcasts and RPCs on a
socket of its own"). Used by :class:`aiida_zmq.channel.Channel` only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import kiwipy
import zmq

from . import protocol
from .exceptions import NoAnswer
from .protocol import Command, ErrorCode
from .ratelimit import RateLimitedLog
from .security import CurveKeys
from .session import Session

__all__ = ('DirectSocket', 'NoAnswer')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)


class DirectSocket:
    """One caller thread's own DEALER socket for the requests that need no session, used by that thread only.

    ``TASK_SUBMIT`` (a task send), ``PUBLISH`` (a broadcast) and ``RPC_SUBMIT`` (an RPC to another client) go out on
    it, and the caller waits on it for the broker's answer (``TASK_CONFIRM``, ``DONE``, ``RPC_UNROUTABLE``, ``ERROR``).
    Why: through the I/O thread, a request crosses two threads (caller to I/O thread, answer back), each a wake-up,
    and those cost a third of a confirmed send (bench, ``tasks``) and half of what waiting for a broadcast's or an
    RPC's routing costs. Answers that need the session (a task's result, an RPC's reply) still come to the session,
    named in the request, where the I/O thread resolves the caller's future.

    At least once, as through the session: a broker that dies holding an unanswered request may have lost it, so when
    the session has been welcomed again (:attr:`aiida_zmq.session.Session.welcomes` changed) the request is sent
    again; an ``RPC_SUBMIT`` the broker refused because it did not know the session yet is sent again then too. An
    answer to an earlier copy is ignored; the copy itself may take effect too.
    """

    #: How often a waiting caller looks whether the communicator was closed or met a restarted broker (seconds).
    CHECK_INTERVAL = 0.05

    def __init__(self, session: Session, curve: CurveKeys | None, closed: Callable[[], bool]) -> None:
        """A socket to ``session``'s broker, watching ``session.welcomes``; ``closed`` says the communicator closed."""
        self._session = session
        self._closed = closed
        self._busy = threading.Lock()  # held while the owner thread uses the socket; close_if_idle() respects it
        socket = session.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)  # nothing to flush at close: an unanswered request is the caller's to resend
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve is not None:
            curve.apply(socket)
        socket.connect(session.endpoint)
        self._socket: zmq.Socket | None = socket  # the owner thread's; closed by another only when idle (_busy)

    @property
    def closed(self) -> bool:
        return self._socket is None

    def __del__(self) -> None:
        # Its thread ended (the thread-local went away): nobody else uses the socket.
        with contextlib.suppress(Exception):
            self._close()

    def close_if_idle(self) -> None:
        """Close the socket unless its thread is using it; that thread closes it on seeing the communicator closed."""
        if self._busy.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._busy.release()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def request(self, correlation: bytes, frames: list[bytes], timeout: float) -> protocol.Message:
        """Send ``frames`` and return the broker's answer that carries ``correlation``.

        :raises NoAnswer: when none came within ``timeout`` seconds.
        :raises kiwipy.CommunicatorClosed: when the communicator was closed meanwhile.
        """
        session = self._session
        deadline = time.monotonic() + timeout
        with self._busy:
            welcomes = session.welcomes
            self._send(frames, deadline)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoAnswer()
                socket = self._ready_socket()
                if socket.poll(int(min(remaining, self.CHECK_INTERVAL) * 1000) + 1):
                    answer = self._answer(correlation, socket.recv_multipart())
                    if answer is not None:
                        return answer
                elif session.welcomes != welcomes:
                    # Welcomed again: the broker restarted (or we were cut off), and may have lost the request.
                    welcomes = session.welcomes
                    self._send(frames, deadline)

    def _ready_socket(self) -> zmq.Socket:
        if self._closed():
            self._close()
            raise kiwipy.CommunicatorClosed('the communicator was closed while a request was on its way')
        assert self._socket is not None
        return self._socket

    def _send(self, frames: list[bytes], deadline: float) -> None:
        socket = self._ready_socket()
        # Blocks only while the socket's queue is full; the caller's timeout bounds it.
        socket.setsockopt(zmq.SNDTIMEO, max(int((deadline - time.monotonic()) * 1000), 1))
        try:
            socket.send_multipart(frames)
        except zmq.Again:
            raise NoAnswer() from None

    def _answer(self, correlation: bytes, frames: list[bytes]) -> protocol.Message | None:
        """The answer for ``correlation``; ``None`` for another one (to an earlier copy) or for "no session yet"."""
        try:
            message = protocol.decode(frames)
        except protocol.ProtocolError as exception:
            LIMITED.warning('dropped a malformed answer to a direct request: %s', exception, key='direct-malformed')
            return None
        args = message.args
        if message.command is Command.ERROR and bytes(args[1]) == ErrorCode.VERSION:
            text = bytes(args[2]).decode(errors='replace')
            raise kiwipy.DeliveryFailed(f'the broker at {self._session.endpoint} refused this client: {text}')
        if not args or bytes(args[0]) != correlation:
            return None
        if message.command is Command.ERROR and bytes(args[1]) == ErrorCode.UNKNOWN_CLIENT:
            return None  # the broker does not know our session yet: sent again once it welcomed it (see request)
        return message
