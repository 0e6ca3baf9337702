"""A profile's communicator: one :class:`kiwipy.Communicator` that is offline or online, and switches by itself.

AiiDA asks its broker for a communicator whenever it builds a runner, whether or not the daemon (which runs the
broker) is up, and keeps it for the life of the interpreter: a notebook opened before ``verdi daemon start`` keeps the
communicator it got then. So the communicator has two modes, decided afresh at every call, and a side for each:

``ONLINE``
    A broker runs, or the daemon does (its arbiter brings the broker back when it restarts). Every call goes through
    the connection to the broker (:class:`aiida_zmq.communicator.ZmqCommunicator`), as with RabbitMQ.
``OFFLINE``
    Neither runs. Every call goes to :class:`aiida_zmq.aiida.offline.OfflineCommunicator`, kiwipy's
    ``LocalCommunicator`` with the broker's store for tasks: messages for subscribers of this communicator are
    delivered here, tasks are stored for when the daemon starts, an RPC for anyone else fails at once with
    :class:`BrokerNotRunning`, and a task queue is read from the store (``verdi process repair``).

Both sides share one registry of subscribers (:class:`aiida_zmq.subscribers.Subscribers`): the connection takes this
communicator's registry when it is made, and tells the broker what it holds then and at each new WELCOME. So a
subscriber added offline is live once a broker runs: a thread watches for the broker while the communicator is
offline and has subscribers (a notebook's process futures hear the daemon's broadcasts once it starts). Going offline
changes nothing on the connection: it keeps trying to reach its broker and registers everything again by itself when
one is back.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import typing as t
from collections.abc import Callable, Iterator

import kiwipy
import shortuuid

from aiida_zmq import discovery
from aiida_zmq.communicator import ZmqCommunicator, encode_name
from aiida_zmq.exceptions import BrokerRunning
from aiida_zmq.ratelimit import RateLimitedLog
from aiida_zmq.subscribers import Subscribers

from .offline import ANNOUNCE_TIMEOUT, BrokerNotRunning, OfflineCommunicator

__all__ = ('ANNOUNCE_TIMEOUT', 'BrokerNotRunning', 'Mode', 'ProfileCommunicator', 'ProfileTaskQueue')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

Encoder = Callable[[t.Any], bytes]
Decoder = Callable[[bytes], t.Any]
Side = ZmqCommunicator | OfflineCommunicator


class Mode(enum.Enum):
    """Where a :class:`ProfileCommunicator`'s calls go (see the module docstring)."""

    OFFLINE = 'offline'
    ONLINE = 'online'
    CLOSED = 'closed'


class ProfileCommunicator(kiwipy.Communicator):
    """The communicator of an AiiDA profile on this broker; see the module docstring.

    :param connect: returns a started :class:`ZmqCommunicator` to the profile's broker (bringing it up in a running
        daemon if needed); called when the communicator first goes online.
    :param daemon_running: whether the profile's daemon runs; asked only when no live broker is found.
    """

    #: Seconds between looks for a broker while offline with subscribers to make live.
    WATCH_INTERVAL = 0.5

    def __init__(
        self,
        *,
        data_dir: str,
        profile_name: str,
        task_queue: str,
        encoder: Encoder,
        decoder: Decoder,
        connect: Callable[[], ZmqCommunicator],
        daemon_running: Callable[[], bool],
    ) -> None:
        self._data_dir = data_dir
        self._info_path = os.path.join(data_dir, discovery.BROKER_INFO_FILENAME)
        self._profile_name = profile_name
        self._queue_name = task_queue
        self._connect = connect
        self._daemon_running = daemon_running
        # Callers' (and the watcher's), under the lock: the mode, the connection, the queue objects.
        self._lock = threading.RLock()
        self._closed = False
        self._connection: ZmqCommunicator | None = None
        self._adopted = False  # the connection took the registry (and the broker has what it held)
        self._queues: dict[str, ProfileTaskQueue] = {}
        #: The one registry of subscribers, shared by both sides (its own lock).
        self._subscribers = Subscribers(self)
        self._offline = OfflineCommunicator(
            self._subscribers,
            data_dir=data_dir,
            profile_name=profile_name,
            task_queue=task_queue,
            encoder=encoder,
            decoder=decoder,
        )
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()

    def __repr__(self) -> str:
        return f'<ProfileCommunicator profile={self._profile_name} data_dir={self._data_dir} {self.mode().value}>'

    # --- mode ------------------------------------------------------------------------------------------------------

    def mode(self) -> Mode:
        """The mode of this call: online (connecting first, and registering what the registry holds) or offline.

        :raises ConnectionError: when the daemon runs but its broker could not be reached in time.
        """
        with self._lock:
            if self._closed:
                return Mode.CLOSED
            if self.broker_live() or self._daemon_running():
                self._go_online()
                return Mode.ONLINE
            self._watch()
            return Mode.OFFLINE

    @property
    def connection(self) -> ZmqCommunicator | None:
        """The connection to the broker, once the communicator was online (for ``admin``; not part of kiwipy)."""
        return self._connection

    def broker_live(self) -> bool:
        """Whether a broker runs: cheap while the connection hears from it, else from ``broker.json`` and its lock.

        While in touch only the file's presence is checked (a stat): a broker that stops removes it. One killed
        leaves it, and the connection notices within two heartbeats.
        """
        connection = self._connection
        if connection is not None and connection.in_touch() and os.path.exists(self._info_path):
            return True
        return discovery.read_live_broker_info(self._data_dir) is not None

    def _go_online(self) -> None:
        if self._connection is None or self._connection.is_closed():
            LOGGER.info('a broker runs for `%s`: connecting to it', self._profile_name)
            self._connection = self._connect()
            self._adopted = False
        if not self._adopted:
            for queue in self._queues.values():
                queue.configure(self._connection)
            # Only once it is done: one that failed half-way (the broker went again) is taken up at the next call.
            self._connection.adopt(self._subscribers)
            self._adopted = True

    def _side(self) -> Side:
        """Where this call goes: the connection online, the offline side offline.

        :raises kiwipy.CommunicatorClosed: once closed.
        """
        mode = self.mode()
        if mode is Mode.CLOSED:
            raise kiwipy.CommunicatorClosed('the communicator is closed')
        if mode is Mode.ONLINE:
            assert self._connection is not None
            return self._connection
        return self._offline

    def _watch(self) -> None:
        """While offline with subscribers, look for a broker in the background, to make them live once it runs."""
        if self._watcher is not None or not self._subscribers:
            return
        self._watcher = threading.Thread(target=self._watch_loop, name='aiida-zmq-watch', daemon=True)
        self._watcher.start()

    def _watch_loop(self) -> None:
        try:
            while not self._stop_watching.wait(self.WATCH_INTERVAL):
                if discovery.read_live_broker_info(self._data_dir) is None:
                    continue
                try:
                    if self.mode() is not Mode.OFFLINE:
                        return
                except Exception as exception:
                    LIMITED.warning('could not go online yet: %s', exception, key='watch')
        finally:
            with self._lock:
                self._watcher = None

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connection, self._connection = self._connection, None
        self._stop_watching.set()
        if connection is not None:
            connection.close()
        self._offline.close()

    # --- kiwipy.Communicator: each call goes to the side of its mode ------------------------------------------------

    def add_rpc_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        """Online: as the connection's (reachable when this returns). Offline: kept here, live once online."""
        identifier = shortuuid.uuid() if identifier is None else identifier
        key = str(identifier)
        encode_name(key, 'an RPC identifier')  # checked now, in either mode: the connection takes it later
        with self._lock:
            self._side().add_rpc_subscriber(subscriber, key)
        return identifier

    def remove_rpc_subscriber(self, identifier: t.Any) -> None:
        """Online: gone from the broker when this returns. Offline: gone here (a broker that starts never has it)."""
        with self._lock:
            self._side().remove_rpc_subscriber(str(identifier))

    def rpc_send(self, recipient_id: t.Any, msg: t.Any) -> kiwipy.Future:
        """Online: through the broker. Offline: to a subscriber of this communicator, else :class:`BrokerNotRunning`
        at once (an ``UnroutableError``: nobody can receive it)."""
        return self._side().rpc_send(recipient_id, msg)

    def add_broadcast_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        """Online: as the connection's (in force when this returns). Offline: kept here, live once online."""
        identifier = shortuuid.uuid() if identifier is None else identifier
        with self._lock:
            self._side().add_broadcast_subscriber(subscriber, identifier)
        return identifier

    def remove_broadcast_subscriber(self, identifier: t.Any) -> None:
        """In either mode: it gets nothing once this returns."""
        with self._lock:
            self._side().remove_broadcast_subscriber(identifier)

    def broadcast_send(
        self, body: t.Any, sender: t.Any = None, subject: t.Any = None, correlation_id: t.Any = None
    ) -> bool:
        """Online: through the broker, to every subscriber. Offline: to this communicator's subscribers."""
        return self._side().broadcast_send(body, sender=sender, subject=subject, correlation_id=correlation_id)

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self.task_queue(self._queue_name).task_send(task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        return self.task_queue(self._queue_name).add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        self.task_queue(self._queue_name).remove_task_subscriber(identifier)

    def task_queue(
        self, queue_name: str, prefetch_size: int | None = None, prefetch_count: int | None = None
    ) -> ProfileTaskQueue:
        """The task queue ``queue_name`` (one object per name); each of its methods goes where the mode of its call
        says."""
        if self._closed:
            raise kiwipy.CommunicatorClosed('the communicator is closed')
        encode_name(queue_name, 'a task queue name')
        with self._lock:
            queue = self._queues.get(queue_name)
            if queue is None:
                queue = self._queues[queue_name] = ProfileTaskQueue(
                    queue_name, side=self._side, live=self.broker_live, offline=self._offline, lock=self._lock
                )
            if prefetch_count is not None:
                queue.prefetch_count = prefetch_count
            return queue


class ProfileTaskQueue:
    """A task queue of a :class:`ProfileCommunicator`: each call goes where its communicator's mode says.

    :param side: the side of the call's mode (:meth:`ProfileCommunicator._side`); ``offline`` is the offline side.
    :param live: whether a broker runs.
    :param lock: the communicator's, held while a subscriber is added or removed, so that a switch of mode waits.
    """

    def __init__(
        self,
        name: str,
        *,
        side: Callable[[], Side],
        live: Callable[[], bool],
        offline: OfflineCommunicator,
        lock: threading.RLock,
    ) -> None:
        self.name = name
        #: Set by callers (``task_queue(name, prefetch_count=...)``); ``None``: the connection's own.
        self.prefetch_count: int | None = None
        self._side = side
        self._live = live
        self._offline = offline
        self._lock = lock

    def configure(self, connection: ZmqCommunicator) -> None:
        """Give the connection this queue's prefetch count, if one was set."""
        connection.task_queue(self.name, prefetch_count=self.prefetch_count)

    def _queue(self) -> t.Any:
        side = self._side()
        if isinstance(side, ZmqCommunicator):
            return side.task_queue(self.name, prefetch_count=self.prefetch_count)
        return side.task_queue(self.name)

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        """Through the broker when one runs; else into its store, where the broker finds it when it starts.

        A task without a reply goes into the store whenever no broker runs, online or not: it is durable there at
        once, and a broker the daemon restarts finds it. One that expects a reply goes through the connection online;
        offline it is stored all the same (it runs when the daemon starts), but no broker means no one to carry the
        result back: the returned future fails with :class:`BrokerNotRunning` saying so (``verdi process repair``
        ignores it).
        """
        if self._offline.is_closed():  # closed with its communicator
            raise kiwipy.CommunicatorClosed('the communicator is closed')
        if no_reply and not self._live():
            with contextlib.suppress(BrokerRunning):  # a broker is starting: through it, below
                return self._offline.task_queue(self.name).task_send(task, no_reply=True)
        while True:
            queue = self._queue()
            try:
                return queue.task_send(task, no_reply=no_reply)
            except BrokerRunning:  # offline: a broker is starting, or another submit is writing: look again
                self._offline.await_lock_or_broker()

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        """Online: the broker hands out tasks of the queue here once this returns. Offline: kept, live once online."""
        identifier = shortuuid.uuid() if identifier is None else identifier
        with self._lock:
            return self._queue().add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        with self._lock:
            self._queue().remove_task_subscriber(identifier)

    def __iter__(self) -> Iterator[t.Any]:
        """Online: the tasks the broker holds. Offline: the stored ones (``verdi process repair``)."""
        yield from self._queue()

    @contextlib.contextmanager
    def next_task(self, no_ack: bool = False, fail: bool = True, timeout: float = 5.0) -> Iterator[t.Any]:
        """The next task of the queue, through the broker online, from the store offline.

        :raises kiwipy.QueueEmpty: when the queue has no task.
        """
        with self._queue().next_task(no_ack, fail, timeout) as task:
            yield task
