"""What the broker reads from its sockets before a handler sees it, and what it answers without a session: one
message read frame by frame within its limits (:meth:`Intake.receive`) and decoded (:meth:`Intake.decode`), refusals
of what is too large or malformed, and the ``unknown-client`` answer to a peer without a session (throttled per
peer)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import zmq

from .. import protocol
from ..exceptions import BadArgument
from ..names import printable_id
from ..protocol import Command, ErrorCode
from ..ratelimit import RateLimitedLog
from .config import BrokerConfig
from .peers import Client

__all__ = ('MAX_CORRELATION', 'Intake')

# A correlation the broker echoes in an ERROR: at most what the protocol lets a correlation be (a longer one is not a
# request, and echoing it is what a peer that never reads would make the broker hold).
MAX_CORRELATION = protocol.FIELD_BYTES['correlation']
_COMMANDS = frozenset(Command)
_NO_SESSION = b'no session: send HELLO'


class Intake:
    """Reads messages within the broker's limits and answers peers that have no session; on the loop thread."""

    def __init__(self, config: BrokerConfig, stats: collections.Counter[str], log: RateLimitedLog) -> None:
        self.config = config
        self.stats = stats
        self.limited_log = log
        self.memory_freed = False  # a message too large was read and dropped: memory to give back
        self._unknown_warned: dict[bytes, float] = {}

    def receive(self, socket: zmq.Socket) -> tuple[list[bytes] | None, int]:
        """Read one message frame by frame; return its frames (None when it was refused) and what it cost the batch.

        ZeroMQ's MAXMSGSIZE bounds one frame only: a message of 150 frames of 1 MiB each was read whole (336 MiB)
        under a 1 MiB limit. Here the frames past ``max_message_bytes`` in all, or past the frame count of the
        message's command, are read and dropped at once (never kept), and the request is answered by its correlation.
        Extra frames count toward the batch, so that a message of 100,000 empty frames does not hold up the others.

        :raises zmq.Again: when the socket has no message.
        """
        frames = [socket.recv(zmq.NOBLOCK)]  # the routing id
        limit = self.config.max_message_bytes
        allowed = 1 + protocol.MAX_FRAMES
        size = count = 0
        refusal: bytes | None = None
        while socket.getsockopt(zmq.RCVMORE):
            if refusal is not None:
                count += 1
                size += len(socket.recv(copy=False))  # dropped without a copy
                continue
            frame: bytes = socket.recv()
            count += 1
            size += len(frame)
            if count == 2:  # the command frame: from now on the message's frame count is known
                allowed = 1 + protocol.frame_count(frame)
            if size > limit:
                refusal = ErrorCode.TOO_LARGE
            elif count + 1 > allowed:
                refusal = ErrorCode.MALFORMED
            else:
                frames.append(frame)
        if refusal is None:
            return frames, 1
        if size > limit:  # too many frames and too many bytes: the size is what the sender must change
            refusal = ErrorCode.TOO_LARGE
        self._refuse(socket, frames, refusal, size, count)
        return None, 1 + count // 8

    def decode(self, socket: zmq.Socket, frames: list[bytes]) -> protocol.Message | None:
        """The message, or None when it cannot be decoded (answered, logged and counted here)."""
        routing_id = frames[0]
        try:
            return protocol.decode(frames[1:])
        except protocol.VersionMismatch as exception:
            self.limited_log.warning('client %r: %s', routing_id, exception, key=('version', routing_id))
            self.send_raw(socket, routing_id, Command.ERROR, b'', ErrorCode.VERSION, str(exception).encode())
        except protocol.ProtocolError as exception:
            self.stats['malformed'] += 1
            self.limited_log.warning(
                'dropped a malformed message from %r: %s', routing_id, exception, key=('malformed', routing_id)
            )
            self.answer_error(socket, frames, ErrorCode.MALFORMED, str(exception))
        return None

    def _refuse(self, socket: zmq.Socket, frames: list[bytes], code: bytes, size: int, count: int) -> None:
        """Answer a message that was too large or had too many frames (by its correlation, when it is a request)."""
        routing_id = frames[0]
        command = frames[2][0] if len(frames) > 2 and len(frames[2]) == 1 else None
        name = Command(command).name if command in _COMMANDS else 'message'
        if code == ErrorCode.TOO_LARGE:
            self.stats['too_large'] += 1
            self.memory_freed = True
            text = f'{name} of {size} bytes exceeds the broker maximum of {self.config.max_message_bytes} bytes'
        else:
            self.stats['malformed'] += 1
            text = f'{name} takes {protocol.frame_count(frames[2]) - 2} arguments, got {count - 2}'
        self.limited_log.warning('client %r: %s: dropped', routing_id, text, key=(code, routing_id))
        self.answer_error(socket, frames, code, text)

    def answer_error(self, socket: zmq.Socket, frames: Sequence[bytes], code: bytes, text: str) -> None:
        """Answer a message that cannot be handled with ERROR: a request by its correlation; anything else only when
        it was too large (the sender learns the limit; a HELLO too large fails the client's connect)."""
        request = (
            len(frames) >= 4
            and frames[1] == protocol.SIGNATURE
            and len(frames[2]) == 1
            and frames[2][0] in protocol.REQUESTS
            and len(frames[3]) <= MAX_CORRELATION
        )
        if request:
            self.send_raw(socket, frames[0], Command.ERROR, frames[3], code, text.encode())
        elif code == ErrorCode.TOO_LARGE:
            self.send_raw(socket, frames[0], Command.ERROR, b'', code, text.encode())

    def bad_argument(
        self,
        socket: zmq.Socket,
        routing_id: bytes,
        message: protocol.Message,
        error: BadArgument,
        *,
        session: Client | None,
        send: Callable[..., None],
    ) -> None:
        """An argument past its bound or a name that is none (``protocol.check_arguments``): ``ERROR malformed``, by
        the request's correlation unless the correlation is what is wrong; through the client's session when it has
        one (``send``), so that the answer counts in its outbound bytes."""
        self.stats['malformed'] += 1
        self.limited_log.warning(
            'dropped a malformed %s from %s: %s',
            message.command.name,
            printable_id(routing_id),
            error,
            key=('malformed', routing_id),
        )
        correlated = message.command in protocol.REQUESTS and error.argument != 'correlation'
        if not correlated and message.command is not Command.HELLO and error.argument != 'correlation':
            return  # not a request: nobody waits for an answer
        answer = (
            Command.ERROR,
            bytes(message.args[0]) if correlated else b'',
            ErrorCode.MALFORMED,
            str(error).encode(),
        )
        if session is not None:
            send(session, *answer)
        else:
            self.send_raw(socket, routing_id, *answer)

    @staticmethod
    def send_raw(socket: zmq.Socket, routing_id: bytes, command: Command, *args: bytes) -> None:
        """Answer a peer that has no session (no Client): best effort, never blocking."""
        try:
            socket.send_multipart([routing_id, *protocol.encode(command, *args)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def no_session(self, socket: zmq.Socket, routing_id: bytes, message: protocol.Message, now: float) -> None:
        """Tell a peer without a session to say HELLO: a request by its correlation (so that the client sends it
        again after its HELLO), anything else at most every half second per peer, or at once for a heartbeat."""
        if message.command in protocol.REQUESTS:
            self.send_raw(socket, routing_id, Command.ERROR, message.args[0], ErrorCode.UNKNOWN_CLIENT, _NO_SESSION)
            return
        if now - self._unknown_warned.get(routing_id, 0.0) > 0.5 or message.command is Command.HEARTBEAT:
            self._unknown_warned[routing_id] = now
            self.send_raw(socket, routing_id, Command.ERROR, b'', ErrorCode.UNKNOWN_CLIENT, _NO_SESSION)

    def tick(self, now: float) -> None:
        """Forget the throttle of peers not heard from for a minute."""
        stale = [key for key, when in self._unknown_warned.items() if when < now - 60]
        for key in stale:
            del self._unknown_warned[key]
