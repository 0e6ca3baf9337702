"""A communicator's one registry of subscribers: RPC, broadcast, and task subscribers by queue.

kiwipy's ``CommunicatorHelper`` keeps the same three tables and raises the same errors; this one is shared between
threads, and between a profile's communicator and its connection to the broker (one registry, whatever the mode: see
:mod:`aiida_zmq.aiida.communicator`). The connection tells the broker what the registry holds each time the broker
welcomes its session, and a subscriber is called with :attr:`Subscribers.communicator` as first argument, the
communicator its owner handed out.

Threads: callers change it; the I/O thread reads it (RPC and broadcast subscribers, what to register again) and so
does the callback thread (task subscribers). A lock guards it; nothing is called under the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import kiwipy

__all__ = ('Subscribers',)


class Subscribers:
    """The registry; see the module docstring."""

    def __init__(self, communicator: kiwipy.Communicator) -> None:
        #: What subscribers get as first argument.
        self.communicator = communicator
        self._lock = threading.Lock()
        # All three guarded by _lock.
        self._rpc: dict[str, Callable] = {}
        self._broadcast: dict[Any, Callable] = {}
        self._tasks: dict[str, dict[Any, Callable]] = {}

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._rpc or self._broadcast or self._tasks)

    # RPC -------------------------------------------------------------------------------------------------------------

    def add_rpc(self, identifier: str, subscriber: Callable) -> None:
        with self._lock:
            if identifier in self._rpc:
                raise kiwipy.DuplicateSubscriberIdentifier(f"RPC identifier '{identifier}'")
            self._rpc[identifier] = subscriber

    def remove_rpc(self, identifier: str) -> None:
        with self._lock:
            if self._rpc.pop(identifier, None) is None:
                raise ValueError(f"Unknown subscriber '{identifier}'")

    def discard_rpc(self, identifier: str) -> None:
        with self._lock:
            self._rpc.pop(identifier, None)

    def rpc(self, identifier: str) -> Callable | None:
        with self._lock:
            return self._rpc.get(identifier)

    def rpc_identifiers(self) -> list[str]:
        with self._lock:
            return list(self._rpc)

    # Broadcasts ------------------------------------------------------------------------------------------------------

    def add_broadcast(self, identifier: Any, subscriber: Callable) -> None:
        with self._lock:
            if identifier in self._broadcast:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Broadcast identifier '{identifier}'")
            self._broadcast[identifier] = subscriber

    def remove_broadcast(self, identifier: Any) -> None:
        with self._lock:
            if self._broadcast.pop(identifier, None) is None:
                raise ValueError(f"Broadcast subscriber '{identifier}' unknown")

    def discard_broadcast(self, identifier: Any) -> None:
        with self._lock:
            self._broadcast.pop(identifier, None)

    def broadcast_subscribers(self) -> list[Callable]:
        with self._lock:
            return list(self._broadcast.values())

    def hears_broadcasts(self) -> bool:
        """Whether the session needs the broker's broadcasts (kiwipy's RMQ communicator binds its broadcast queue with
        its first RPC or broadcast subscriber)."""
        with self._lock:
            return bool(self._rpc or self._broadcast)

    # Tasks -----------------------------------------------------------------------------------------------------------

    def add_task(self, queue: str, identifier: Any, subscriber: Callable) -> bool:
        """Add a task subscriber of ``queue``; return whether it is the queue's first."""
        with self._lock:
            subscribers = self._tasks.setdefault(queue, {})
            if identifier in subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Task identifier '{identifier}'")
            subscribers[identifier] = subscriber
            return len(subscribers) == 1

    def remove_task(self, queue: str, identifier: Any) -> bool:
        """Remove a task subscriber of ``queue``; return whether it was the queue's last."""
        with self._lock:
            subscribers = self._tasks.get(queue, {})
            if subscribers.pop(identifier, None) is None:
                raise ValueError(f"Unknown task subscriber '{identifier}'")
            if subscribers:
                return False
            del self._tasks[queue]
            return True

    def task_subscribers(self, queue: str) -> list[Callable]:
        with self._lock:
            return list(self._tasks.get(queue, {}).values())

    def consumed_queues(self) -> list[str]:
        """The queues with a task subscriber."""
        with self._lock:
            return list(self._tasks)
