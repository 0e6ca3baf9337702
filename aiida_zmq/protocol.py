"""The aiida-zmq wire protocol (AZMQ/3): the one place that knows how messages look on the wire.

Every message is a ZeroMQ multipart message. Seen from a client's DEALER socket it is::

    frame 0   signature  b'AZMQ/3'  (protocol name and version)
    frame 1   command    one byte (see :class:`Command`)
    frame 2.. arguments  a fixed number per command (see :data:`SPECS`)

The broker's ROUTER socket sees one more frame in front: the client's routing id. Numbers travel as ASCII
decimals, names as UTF-8, payloads as opaque bytes the broker never decodes. ``docs/protocol.md`` is the
specification this module follows, frame by frame.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .exceptions import BadArgument, ProtocolError, VersionMismatch
from .names import MAX_NAME_BYTES, check_name

__all__ = (
    'ANSWERS',
    'ARGUMENTS',
    'FIELD_BYTES',
    'FROM_CLIENT',
    'NAME_FIELDS',
    'REQUESTS',
    'SESSIONLESS',
    'SIGNATURE',
    'SPECS',
    'Command',
    'Direction',
    'ErrorCode',
    'Message',
    'ProtocolError',
    'Spec',
    'VersionMismatch',
    'check_arguments',
    'decode',
    'encode',
    'to_int',
)

PROTOCOL_NAME = b'AZMQ'
VERSION = 3
SIGNATURE = b'AZMQ/%d' % VERSION

FLAG_TRUE = b'1'
FLAG_FALSE = b'0'


class Command(enum.IntEnum):
    """Message kinds. In the comments, C = client to broker, B = broker to client (:data:`SPECS` says it for the
    code)."""

    # Session
    # C: name, heartbeat_ms, reclaim ("id:attempt,id:attempt" still being processed), pid, secret (the one the broker
    # handed this session in an earlier WELCOME; empty for a new session)
    HELLO = 0x01
    WELCOME = 0x02  # B: epoch, heartbeat_ms, max_message_bytes, secret (this session's, for it only)
    HEARTBEAT = 0x03  # C/B: (none)
    BYE = 0x04  # C: (none); a clean goodbye: held tasks go back without counting as a failed delivery
    # B: correlation; the request with that correlation is in force (SUBSCRIBE, CONSUME, CANCEL, RPC_UNREGISTER), done
    # (PUBLISH: sent to every subscriber) or routed (RPC_CALL: handed to its recipient). The caller returns then, as
    # kiwipy's RMQ communicator returns once RabbitMQ answered the matching AMQP method.
    DONE = 0x05

    # Tasks
    TASK_SEND = 0x10  # C: correlation, queue, no_reply flag, payload
    # B: correlation, task_id, held_here (sent only after the task is committed to disk; held_here = 1 when the task
    # was handed in the same batch to the sender's own session, whose subscriber the sender waits for)
    TASK_CONFIRM = 0x11
    CONSUME = 0x12  # C: correlation, queue, prefetch (0 = unlimited); answered DONE
    CANCEL = 0x13  # C: correlation, queue; answered DONE
    TASK_DELIVER = 0x14  # B: queue, task_id, attempt, no_reply flag, payload
    TASK_REPLY = 0x15  # C: task_id, attempt, final flag, payload (final=1 also acknowledges the task)
    TASK_ACK = 0x16  # C: task_id, attempt
    TASK_NACK = 0x17  # C: task_id, attempt, rejected flag (1 = refused: counts and backs off; 0 = released)
    TASK_RESULT = 0x18  # B: correlation, final flag, payload (a consumer's reply, forwarded to the sender)
    TASK_GET = 0x19  # C: correlation, queue
    TASK_GOT = 0x1A  # B: correlation, task_id ('' when the queue is empty), attempt, no_reply flag, payload
    # C, from a sender socket without a session: correlation, session (the secret of the sender's session, which gets
    # the results unless no_reply), queue, no_reply flag, payload. Answered like TASK_SEND (TASK_CONFIRM or ERROR)
    # on the socket it came from.
    TASK_SUBMIT = 0x1B

    # RPC
    RPC_REGISTER = 0x20  # C: correlation, identifier
    RPC_REGISTERED = 0x21  # B: correlation, status ('ok' or 'duplicate')
    RPC_UNREGISTER = 0x22  # C: correlation, identifier; answered DONE
    RPC_CALL = 0x23  # C: correlation, identifier, payload; answered DONE once routed, or RPC_UNROUTABLE
    RPC_REQUEST = 0x24  # B: call_id, identifier, payload
    RPC_REPLY = 0x25  # C: call_id, final flag, payload
    RPC_RESULT = 0x26  # B: correlation, final flag, payload
    RPC_UNROUTABLE = 0x27  # B: correlation, reason
    # C, from a socket without a session (like TASK_SUBMIT): correlation, session (the secret of the session whose
    # RPC_RESULTs it is), identifier, payload. Answered DONE / RPC_UNROUTABLE on the socket it came from; ERROR
    # unknown-client when the broker has no such session (yet): send it again once welcomed.
    RPC_SUBMIT = 0x28

    # Broadcast
    SUBSCRIBE = 0x30  # C: correlation; from now on this client receives every broadcast; answered DONE
    UNSUBSCRIBE = 0x31  # C: (none)
    BROADCAST = 0x32  # B: payload (a broadcast, to every subscribed client)
    # C: correlation, payload; a broadcast for every subscribed client; answered DONE on the socket it came from (a
    # session's or one without a session, like TASK_SUBMIT)
    PUBLISH = 0x33

    # Administration (status, peer-gone, dead letters): small JSON documents, never task payloads
    ADMIN = 0x40  # C: correlation, request (JSON object with an "op" key)
    ADMIN_REPLY = 0x41  # B: correlation, status ('ok' or 'error'), response (JSON)

    # Errors
    ERROR = 0x7F  # B: correlation ('' when not tied to a request), code, text


class Direction(enum.Enum):
    """Who sends a command."""

    TO_BROKER = 'client to broker'
    TO_CLIENT = 'broker to client'
    BOTH = 'both ways'


@dataclass(frozen=True)
class Spec:
    """Everything the protocol says about one command; the tables of the broker and of the client's session are
    derived from :data:`SPECS` (a new command is one entry here, its handler in the broker, and its client code)."""

    direction: Direction
    arguments: tuple[str, ...]  # argument frames, in order; their count is checked on every decoded message
    #: A request: its first argument is a correlation, and the broker answers it with one of these (or with ERROR,
    #: which any request may get), echoing that correlation.
    answers: tuple[Command, ...] = ()
    #: It may come from a socket without a session (a caller thread's direct socket); answered on that socket.
    sessionless: bool = False

    @property
    def correlated(self) -> bool:
        """Whether it is a request answered by its correlation."""
        return bool(self.answers)


_C, _B, _CB = Direction.TO_BROKER, Direction.TO_CLIENT, Direction.BOTH

SPECS: dict[Command, Spec] = {
    Command.HELLO: Spec(_C, ('name', 'heartbeat_ms', 'reclaim', 'pid', 'secret')),
    Command.WELCOME: Spec(_B, ('epoch', 'heartbeat_ms', 'max_message_bytes', 'secret')),
    Command.HEARTBEAT: Spec(_CB, ()),
    Command.BYE: Spec(_C, ()),
    Command.DONE: Spec(_B, ('correlation',)),
    Command.TASK_SEND: Spec(_C, ('correlation', 'queue', 'no_reply', 'payload'), (Command.TASK_CONFIRM,)),
    Command.TASK_CONFIRM: Spec(_B, ('correlation', 'task_id', 'held_here')),
    Command.CONSUME: Spec(_C, ('correlation', 'queue', 'prefetch'), (Command.DONE,)),
    Command.CANCEL: Spec(_C, ('correlation', 'queue'), (Command.DONE,)),
    Command.TASK_DELIVER: Spec(_B, ('queue', 'task_id', 'attempt', 'no_reply', 'payload')),
    Command.TASK_REPLY: Spec(_C, ('task_id', 'attempt', 'final', 'payload')),
    Command.TASK_ACK: Spec(_C, ('task_id', 'attempt')),
    Command.TASK_NACK: Spec(_C, ('task_id', 'attempt', 'rejected')),
    Command.TASK_RESULT: Spec(_B, ('correlation', 'final', 'payload')),
    Command.TASK_GET: Spec(_C, ('correlation', 'queue'), (Command.TASK_GOT,)),
    Command.TASK_GOT: Spec(_B, ('correlation', 'task_id', 'attempt', 'no_reply', 'payload')),
    Command.TASK_SUBMIT: Spec(
        _C, ('correlation', 'session', 'queue', 'no_reply', 'payload'), (Command.TASK_CONFIRM,), sessionless=True
    ),
    Command.RPC_REGISTER: Spec(_C, ('correlation', 'identifier'), (Command.RPC_REGISTERED,)),
    Command.RPC_REGISTERED: Spec(_B, ('correlation', 'status')),
    Command.RPC_UNREGISTER: Spec(_C, ('correlation', 'identifier'), (Command.DONE,)),
    Command.RPC_CALL: Spec(_C, ('correlation', 'identifier', 'payload'), (Command.DONE, Command.RPC_UNROUTABLE)),
    Command.RPC_REQUEST: Spec(_B, ('call_id', 'identifier', 'payload')),
    Command.RPC_REPLY: Spec(_C, ('call_id', 'final', 'payload')),
    Command.RPC_RESULT: Spec(_B, ('correlation', 'final', 'payload')),
    Command.RPC_UNROUTABLE: Spec(_B, ('correlation', 'reason')),
    Command.RPC_SUBMIT: Spec(
        _C,
        ('correlation', 'session', 'identifier', 'payload'),
        (Command.DONE, Command.RPC_UNROUTABLE),
        sessionless=True,
    ),
    Command.SUBSCRIBE: Spec(_C, ('correlation',), (Command.DONE,)),
    Command.UNSUBSCRIBE: Spec(_C, ()),
    Command.BROADCAST: Spec(_B, ('payload',)),
    Command.PUBLISH: Spec(_C, ('correlation', 'payload'), (Command.DONE,), sessionless=True),
    Command.ADMIN: Spec(_C, ('correlation', 'request'), (Command.ADMIN_REPLY,)),
    Command.ADMIN_REPLY: Spec(_B, ('correlation', 'status', 'response')),
    Command.ERROR: Spec(_B, ('correlation', 'code', 'text')),
}

# Derived from SPECS, never written by hand:
#: Argument names per command.
ARGUMENTS: dict[Command, tuple[str, ...]] = {command: spec.arguments for command, spec in SPECS.items()}
#: Requests: their first argument is a correlation, echoed by their answer.
REQUESTS: frozenset[Command] = frozenset(command for command, spec in SPECS.items() if spec.correlated)
#: Commands a socket without a session may send.
SESSIONLESS: frozenset[Command] = frozenset(command for command, spec in SPECS.items() if spec.sessionless)
#: Commands a client may send (the broker handles each; it drops any other from a client).
FROM_CLIENT: frozenset[Command] = frozenset(c for c, spec in SPECS.items() if spec.direction is not Direction.TO_CLIENT)
#: Answers to requests (their first argument is the request's correlation): ERROR and what SPECS name.
ANSWERS: frozenset[Command] = frozenset(
    {Command.ERROR, *(answer for spec in SPECS.values() for answer in spec.answers)}
)

#: The most bytes an argument of this name may carry, in every command that has it. Answers echo correlations and
#: names (an ERROR its request's correlation, RPC_UNROUTABLE the identifier), so these bound every answer too: a
#: peer that never reads can make the broker hold at most ZeroMQ's queue of such small answers, not of 8 MiB echoes.
#: Payloads, ADMIN requests and the reclaim list are bounded by the message size only.
FIELD_BYTES: dict[str, int] = {
    'correlation': 128,  # the communicator's are short decimals
    'session': 128,  # a session's secret (WELCOME)
    'secret': 128,
    'name': MAX_NAME_BYTES,
    'queue': MAX_NAME_BYTES,
    'identifier': MAX_NAME_BYTES,
    'heartbeat_ms': 20,
    'pid': 20,
    'task_id': 20,
    'attempt': 20,
    'call_id': 20,
    'prefetch': 20,
    'no_reply': 1,
    'final': 1,
    'rejected': 1,
}
#: Arguments that are names a peer chooses: UTF-8 without control characters (:mod:`aiida_zmq.names`).
NAME_FIELDS: dict[str, str] = {'name': 'client name', 'queue': 'queue name', 'identifier': 'RPC identifier'}
#: Names that may be empty (a client without a name).
_MAY_BE_EMPTY = frozenset({'name'})


def check_arguments(message: Message) -> None:
    """Check the arguments of a message from a client against their bounds (:data:`FIELD_BYTES`) and names against
    :func:`aiida_zmq.names.check_name`.

    :raises BadArgument: naming the first argument that is not what it must be.
    """
    for field, value in zip(ARGUMENTS[message.command], message.args, strict=True):
        bound = FIELD_BYTES.get(field)
        if bound is not None and len(value) > bound:
            raise BadArgument(
                field, f'{message.command.name}: the {field} has at most {bound} bytes, got {len(value)} bytes'
            )
        kind = NAME_FIELDS.get(field)
        if kind is not None and (value or field not in _MAY_BE_EMPTY):
            try:
                check_name(kind, bytes(value))
            except ValueError as exception:
                raise BadArgument(field, f'{message.command.name}: {exception}') from None


_COMMAND_BYTES: dict[int, bytes] = {command: bytes((command,)) for command in Command}
_ARITY: dict[int, int] = {command: len(names) for command, names in ARGUMENTS.items()}

#: The most frames any message has: signature, command and the most arguments of any command.
MAX_FRAMES = 2 + max(_ARITY.values())


def frame_count(command_frame: bytes) -> int:
    """How many frames (signature and command included) a message with this command frame has; for an unknown
    command :data:`MAX_FRAMES`, the most any message has. A receiver reads no more than that of one message."""
    arity = _ARITY.get(command_frame[0]) if len(command_frame) == 1 else None
    return MAX_FRAMES if arity is None else 2 + arity


class ErrorCode:
    """Values of the ``code`` frame of :attr:`Command.ERROR`."""

    VERSION = b'version'  # the client speaks another protocol version
    UNKNOWN_CLIENT = b'unknown-client'  # the broker has no session for this client (it restarted): say HELLO
    TOO_LARGE = b'too-large'  # the message exceeds the broker's maximum message size
    MALFORMED = b'malformed'  # wrong frame count or an unparsable argument
    STORE = b'store'  # the store could not commit the task (disk full, read-only): the task was not accepted
    LIMIT = b'limit'  # a bound of the broker was reached (queues per client, queues in all): the request was refused
    # HELLO for a routing id whose session lives, without that session's secret: refused, the session stays its owner's
    SESSION_TAKEN = b'session-taken'


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its command and its argument frames, in the order of :data:`ARGUMENTS`."""

    command: Command
    args: Sequence[bytes]


def encode(command: Command, *args: bytes) -> list[bytes]:
    """Return the frames of a message (without the ROUTER's routing-id frame)."""
    if len(args) != _ARITY[command]:
        raise ProtocolError(f'{command.name} takes {_ARITY[command]} arguments, got {len(args)}')
    return [SIGNATURE, _COMMAND_BYTES[command], *args]


def decode(frames: Sequence[bytes]) -> Message:
    """Decode the frames of a message (without the routing-id frame).

    :raises VersionMismatch: when the signature names this protocol with another version.
    :raises ProtocolError: for anything else that does not follow the protocol.
    """
    if len(frames) < 2:
        raise ProtocolError(f'a message has at least 2 frames, got {len(frames)}')
    signature = bytes(frames[0])
    if signature != SIGNATURE:
        if signature.startswith(PROTOCOL_NAME + b'/'):
            raise VersionMismatch(signature, SIGNATURE)
        raise ProtocolError(f'not an aiida-zmq message (signature {signature[:16]!r})')
    command_frame = frames[1]
    if len(command_frame) != 1:
        raise ProtocolError('the command frame must be exactly one byte')
    code = command_frame[0]
    arity = _ARITY.get(code)
    if arity is None:
        raise ProtocolError(f'unknown command 0x{code:02x}')
    if len(frames) - 2 != arity:
        raise ProtocolError(f'{Command(code).name} takes {arity} arguments, got {len(frames) - 2}')
    return Message(Command(code), frames[2:])


def to_int(value: bytes) -> int:
    """Parse an ASCII decimal argument; raises :class:`ProtocolError` when it is not one."""
    try:
        return int(value)
    except ValueError:
        raise ProtocolError(f'expected a decimal number, got {bytes(value)[:32]!r}')


def flag(value: bool) -> bytes:
    """Encode a boolean argument."""
    return FLAG_TRUE if value else FLAG_FALSE


def number(value: int) -> bytes:
    """Encode an integer argument."""
    return b'%d' % value
