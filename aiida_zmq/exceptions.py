"""Every exception of aiida-zmq. Client-side failures reuse kiwipy's exceptions so that callers catch what they know.

Only kiwipy is imported here: the broker (:mod:`aiida_zmq.broker`, :mod:`aiida_zmq.protocol`) imports this module and
stays free of AiiDA.
"""

from __future__ import annotations

import kiwipy

__all__ = (
    'AdminError',
    'AdminRequestError',
    'BadArgument',
    'BrokerNotFound',
    'BrokerNotRunning',
    'BrokerRestarted',
    'BrokerRunning',
    'BrokerUnavailable',
    'BrokerUnreachable',
    'CircusCallError',
    'CoreZeromqRunning',
    'MessageTooLarge',
    'MoveStopped',
    'NoAnswer',
    'ProtocolError',
    'StoreError',
    'StoreInUse',
    'StoreReplaced',
    'TaskNotAccepted',
    'UnsafePath',
    'VersionMismatch',
)


class StoreError(RuntimeError):
    """The task store cannot be opened or written (corrupt file, disk full, read-only directory, wrong schema)."""


class MoveStopped(StoreError):
    """A move between core.zeromq and the store stopped on the way (a full disk): ``moved`` tasks were moved, each
    once, the rest are where they were; the message says both, and that a rerun moves the rest."""

    def __init__(self, message: str, moved: int) -> None:
        super().__init__(message)
        self.moved = moved


class StoreReplaced(StoreError):
    """The store file is not the one the broker left (truncated, its WAL lost, another store put in its place): the
    broker refuses to start rather than serve what is left as if nothing had happened."""


class StoreInUse(Exception):
    """The store belongs to a profile, or a broker holds it: it is not removed."""


class UnsafePath(PermissionError):
    """A directory or socket that another user controls (its owner, a symbolic link, its mode): using it would let
    them read the tasks or put a broker of their own in the way."""


class BrokerRunning(RuntimeError):
    """A broker holds the data directory: tasks must go through it, not straight into its store."""


class BrokerUnavailable(ConnectionError):
    """No broker answered at the endpoint within the time allowed."""


class MessageTooLarge(kiwipy.DeliveryFailed):
    """A message is larger than the broker accepts (``max_message_bytes``); it was not sent."""


class TaskNotAccepted(kiwipy.DeliveryFailed):
    """The broker refused to store a task (for instance its disk is full); the task was not queued."""


class BrokerRestarted(kiwipy.DeliveryFailed):
    """The broker restarted while an RPC was in flight: whether the recipient acted on it is unknown."""


class AdminError(RuntimeError):
    """The broker refused an administrative request (unknown operation, bad argument)."""


class BrokerUnreachable(kiwipy.UnroutableError):
    """The broker did not answer in time whether it routed a message (it is down or restarting): it was not routed.

    An ``UnroutableError``, so that callers that handle a message nobody can receive (aiida-core's ``Process.kill``
    sending kills to its children) handle this too.
    """


class BrokerNotRunning(kiwipy.UnroutableError):
    """The message needs a running broker (it is for a process of another interpreter), and none runs."""


class BrokerNotFound(ConnectionError):
    """No live broker could be found for a data directory within the time allowed."""


class NoAnswer(Exception):
    """The broker did not answer a direct request in time (internal: each caller says what that means for it)."""


# --- the protocol and the broker's ADMIN requests -------------------------------------------------------------------


class ProtocolError(ValueError):
    """A message that does not follow the protocol: wrong signature, unknown command or wrong frame count."""


class VersionMismatch(ProtocolError):
    """A peer speaks another version of the protocol."""

    def __init__(self, signature: bytes, ours: bytes) -> None:
        super().__init__(
            f'peer speaks {signature[:16]!r}, this side speaks {ours.decode()}: '
            'install the same aiida-zmq version for the broker and its clients'
        )
        self.signature = signature


class BadArgument(ProtocolError):
    """An argument past its bound (:data:`aiida_zmq.protocol.FIELD_BYTES`), or a name that is not one (not UTF-8, a
    control character): the request is answered ``ERROR malformed`` with this text."""

    def __init__(self, argument: str, text: str) -> None:
        super().__init__(text)
        self.argument = argument


class AdminRequestError(ValueError):
    """An ADMIN request that cannot run: its text says what was expected."""


# --- what the broker runs in and beside -----------------------------------------------------------------------------


class CircusCallError(RuntimeError):
    """The arbiter answered with an error, or did not answer in time."""


class CoreZeromqRunning(RuntimeError):
    """core.zeromq's broker runs on the directory: its tasks are in its hands, not to be moved."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
