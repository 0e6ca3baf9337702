"""Exceptions of aiida-zmq. Client-side failures reuse kiwipy's exceptions so that callers catch what they know."""

from __future__ import annotations

import kiwipy

__all__ = (
    'AdminError',
    'BrokerRestarted',
    'BrokerRunning',
    'BrokerUnavailable',
    'BrokerUnreachable',
    'MessageTooLarge',
    'StoreError',
    'StoreReplaced',
    'TaskNotAccepted',
    'UnsafePath',
)


class StoreError(RuntimeError):
    """The task store cannot be opened or written (corrupt file, disk full, read-only directory, wrong schema)."""


class StoreReplaced(StoreError):
    """The store file is not the one the broker left (truncated, its WAL lost, another store put in its place): the
    broker refuses to start rather than serve what is left as if nothing had happened."""


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
