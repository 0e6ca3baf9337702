"""A profile's communicator: one :class:`kiwipy.Communicator` that is offline or online, and switches by itself.

AiiDA asks its broker for a communicator whenever it builds a runner, whether or not the daemon (which runs the
broker) is up, and keeps it for the life of the interpreter: a notebook opened before ``verdi daemon start`` keeps the
communicator it got then. So the communicator has two modes, decided afresh at every call:

``ONLINE``
    A broker runs, or the daemon does (its arbiter brings the broker back when it restarts). Every call goes through
    the connection to the broker (:class:`aiida_zmq.communicator.ZmqCommunicator`), as with RabbitMQ.
``OFFLINE``
    Neither runs. Subscribers are kept here and messages for them delivered here, on a thread of this communicator
    (what ``run()`` needs for its own processes); tasks go into the broker's store
    (:func:`aiida_zmq.store.submit_offline`), where the broker finds them when the daemon starts; an RPC for anyone
    else fails at once with :class:`BrokerNotRunning`, which says to start the daemon; a task queue is read from the
    store (``verdi process repair``, which wants the daemon stopped).

Every subscriber lives in this communicator's registry, whatever the mode; the connection is brought in line with
the registry whenever the communicator goes online. So a subscriber added offline is live once a broker runs: a
thread watches for the broker while the communicator is offline and has subscribers (a notebook's process futures
hear the daemon's broadcasts once it starts). Going offline changes nothing on the connection: it keeps trying to
reach its broker and re-registers everything by itself when one is back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
import os
import threading
import time
import typing as t
from collections.abc import Callable, Iterator

import kiwipy
import shortuuid

from aiida_zmq import discovery, store
from aiida_zmq.communicator import ZmqCommunicator, encode_name
from aiida_zmq.exceptions import BrokerRunning
from aiida_zmq.ratelimit import RateLimitedLog

from .offline import BrokerNotRunning, OfflineTaskQueue

__all__ = ('Mode', 'ProfileCommunicator', 'ProfileTaskQueue')

LOGGER = logging.getLogger(__name__)
LIMITED = RateLimitedLog(LOGGER)

Encoder = Callable[[t.Any], bytes]
Decoder = Callable[[bytes], t.Any]

#: Seconds to wait for a broker that holds the store's lock to announce itself (it binds, then writes broker.json).
ANNOUNCE_TIMEOUT = 30.0


class Mode(enum.Enum):
    """Where a :class:`ProfileCommunicator`'s calls go (see the module docstring)."""

    OFFLINE = 'offline'
    ONLINE = 'online'
    CLOSED = 'closed'


class _Delivered:
    """A subscriber as the connection calls it: with this communicator, not the connection, as first argument."""

    def __init__(self, communicator: ProfileCommunicator, subscriber: Callable) -> None:
        self._communicator = communicator
        self._subscriber = subscriber

    def __call__(self, _connection: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        return self._subscriber(self._communicator, *args, **kwargs)


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
        self._encoder = encoder
        self._decoder = decoder
        self._connect = connect
        self._daemon_running = daemon_running
        self._lock = threading.RLock()  # the registry, the connection and what it holds
        self._closed = False
        self._connection: ZmqCommunicator | None = None
        # The registry: every subscriber, whatever the mode.
        self._rpc: dict[str, Callable] = {}
        self._broadcast: dict[t.Any, Callable] = {}
        self._tasks: dict[str, dict[t.Any, Callable]] = {}
        self._prefetch: dict[str, int | None] = {}
        # What the connection holds of it.
        self._connected_rpc: set[str] = set()
        self._connected_broadcast: set[t.Any] = set()
        self._connected_tasks: dict[str, set[t.Any]] = {}
        self._out_of_sync = False  # the registry changed while offline: sync when going online
        # Offline deliveries run here, as a broker's would on the connection's threads: never on the caller's.
        self._local = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='aiida-zmq-offline')
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()

    def __repr__(self) -> str:
        return f'<ProfileCommunicator profile={self._profile_name} data_dir={self._data_dir} {self.mode().value}>'

    # --- mode ------------------------------------------------------------------------------------------------------

    def mode(self) -> Mode:
        """The mode of this call: online (connecting and syncing the registry first) or offline.

        :raises ConnectionError: when the daemon runs but its broker could not be reached in time.
        """
        with self._lock:
            if self._closed:
                return Mode.CLOSED
            if self._broker_live() or self._daemon_running():
                self._go_online()
                return Mode.ONLINE
            self._watch()
            return Mode.OFFLINE

    @property
    def connection(self) -> ZmqCommunicator | None:
        """The connection to the broker, once the communicator was online (for ``admin``; not part of kiwipy)."""
        return self._connection

    def _broker_live(self) -> bool:
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
            self._out_of_sync = True
        if self._out_of_sync:
            self._sync()

    def _sync(self) -> None:
        """Bring the connection in line with the registry (what was added or removed while offline)."""
        connection = self._connection
        assert connection is not None
        for key in list(self._connected_rpc - self._rpc.keys()):
            connection.remove_rpc_subscriber(key)
            self._connected_rpc.discard(key)
        for key in list(self._rpc.keys() - self._connected_rpc):
            try:
                connection.add_rpc_subscriber(_Delivered(self, self._rpc[key]), key)
            except kiwipy.DuplicateSubscriberIdentifier:
                LOGGER.error('RPC identifier %s, taken offline, is held by another client of the broker', key)
                continue
            self._connected_rpc.add(key)
        for identifier in list(self._connected_broadcast - self._broadcast.keys()):
            connection.remove_broadcast_subscriber(identifier)
            self._connected_broadcast.discard(identifier)
        for identifier in list(self._broadcast.keys() - self._connected_broadcast):
            connection.add_broadcast_subscriber(_Delivered(self, self._broadcast[identifier]), identifier)
            self._connected_broadcast.add(identifier)
        for name in set(self._tasks) | set(self._connected_tasks):
            subscribers = self._tasks.get(name, {})
            connected = self._connected_tasks.setdefault(name, set())
            queue = connection.task_queue(name, prefetch_count=self._prefetch.get(name))
            for identifier in list(connected - subscribers.keys()):
                queue.remove_task_subscriber(identifier)
                connected.discard(identifier)
            for identifier in list(subscribers.keys() - connected):
                queue.add_task_subscriber(_Delivered(self, subscribers[identifier]), identifier)
                connected.add(identifier)
        self._out_of_sync = False  # only now: a sync that failed half-way (the broker went again) is taken up again

    def _watch(self) -> None:
        """While offline with subscribers, look for a broker in the background, to make them live once it runs."""
        if self._watcher is not None or not (self._rpc or self._broadcast or self._tasks):
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
        self._local.shutdown(wait=False, cancel_futures=True)

    def _open_mode(self) -> Mode:
        mode = self.mode()
        if mode is Mode.CLOSED:
            raise kiwipy.CommunicatorClosed('the communicator is closed')
        return mode

    def _online(self) -> ZmqCommunicator:
        connection = self._connection
        assert connection is not None, 'only called once online'
        return connection

    def _not_running(self, what: str) -> BrokerNotRunning:
        return BrokerNotRunning(
            f'cannot {what}: the broker of profile `{self._profile_name}` is not running. It runs with the daemon: '
            f'start it with `verdi -p {self._profile_name} daemon start` (submitting works without it, the task '
            'waits in the store).'
        )

    # --- RPC -------------------------------------------------------------------------------------------------------

    def add_rpc_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        """Online: as the connection's (reachable when this returns). Offline: kept here, live once online."""
        identifier = shortuuid.uuid() if identifier is None else identifier
        key = str(identifier)
        encode_name(key, 'an RPC identifier')  # checked now, in either mode: the connection takes it later
        with self._lock:
            mode = self._open_mode()
            if key in self._rpc:
                raise kiwipy.DuplicateSubscriberIdentifier(f"RPC identifier '{identifier}'")
            if mode is Mode.ONLINE:
                self._online().add_rpc_subscriber(_Delivered(self, subscriber), key)
                self._connected_rpc.add(key)
            else:
                self._out_of_sync = True
            self._rpc[key] = subscriber
        return identifier

    def remove_rpc_subscriber(self, identifier: t.Any) -> None:
        """Online: gone from the broker when this returns. Offline: gone here; from the broker once online."""
        key = str(identifier)
        with self._lock:
            mode = self._open_mode()
            if self._rpc.pop(key, None) is None:
                raise ValueError(f"Unknown subscriber '{identifier}'")
            if mode is Mode.ONLINE and key in self._connected_rpc:
                self._connected_rpc.discard(key)
                self._online().remove_rpc_subscriber(key)
            elif key in self._connected_rpc:
                self._out_of_sync = True

    def rpc_send(self, recipient_id: t.Any, msg: t.Any) -> kiwipy.Future:
        """Online: through the broker. Offline: to a subscriber of this communicator, else :class:`BrokerNotRunning`
        at once (an ``UnroutableError``: nobody can receive it)."""
        if self._open_mode() is Mode.ONLINE:
            return self._online().rpc_send(recipient_id, msg)
        subscriber = self._rpc.get(str(recipient_id))
        if subscriber is None:
            raise self._not_running(f'send an RPC to `{recipient_id}`')
        future: kiwipy.Future = kiwipy.Future()
        # Through the codec, as a broker would: the subscriber gets a copy, never the sender's objects.
        payload = self._encoder(msg)
        self._local.submit(self._run_rpc, subscriber, payload, future)
        return future

    def _run_rpc(self, subscriber: Callable, payload: bytes, future: kiwipy.Future) -> None:
        try:
            result = subscriber(self, self._decoder(payload))
        except Exception as exception:
            future.set_exception(kiwipy.RemoteException(f'{type(exception).__name__}: {exception}'))
            return
        if isinstance(result, concurrent.futures.Future):
            kiwipy.chain(result, future)
        else:
            with kiwipy.capture_exceptions(future):
                future.set_result(self._decoder(self._encoder(result)))

    # --- broadcasts ------------------------------------------------------------------------------------------------

    def add_broadcast_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        """Online: as the connection's (in force when this returns). Offline: kept here, live once online."""
        identifier = shortuuid.uuid() if identifier is None else identifier
        with self._lock:
            mode = self._open_mode()
            if identifier in self._broadcast:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Broadcast identifier '{identifier}'")
            if mode is Mode.ONLINE:
                self._online().add_broadcast_subscriber(_Delivered(self, subscriber), identifier)
                self._connected_broadcast.add(identifier)
            else:
                self._out_of_sync = True
            self._broadcast[identifier] = subscriber
        return identifier

    def remove_broadcast_subscriber(self, identifier: t.Any) -> None:
        """In either mode: it gets nothing once this returns."""
        with self._lock:
            mode = self._open_mode()
            if self._broadcast.pop(identifier, None) is None:
                raise ValueError(f"Broadcast subscriber '{identifier}' unknown")
            if mode is Mode.ONLINE and identifier in self._connected_broadcast:
                self._connected_broadcast.discard(identifier)
                self._online().remove_broadcast_subscriber(identifier)
            elif identifier in self._connected_broadcast:
                self._out_of_sync = True

    def broadcast_send(
        self, body: t.Any, sender: t.Any = None, subject: t.Any = None, correlation_id: t.Any = None
    ) -> bool:
        """Online: through the broker, to every subscriber. Offline: to this communicator's subscribers.

        Offline there is no one else to tell: the daemon is stopped, and a process run elsewhere learns of a state
        change by polling the database, as it does after a missed broadcast.
        """
        if self._open_mode() is Mode.ONLINE:
            return self._online().broadcast_send(body, sender=sender, subject=subject, correlation_id=correlation_id)
        message = self._encoder({'body': body, 'sender': sender, 'subject': subject, 'correlation_id': correlation_id})
        self._local.submit(self._run_broadcast, message)
        return True

    def _run_broadcast(self, payload: bytes) -> None:
        message = self._decoder(payload)
        with self._lock:
            subscribers = list(self._broadcast.values())
        for subscriber in subscribers:
            try:
                subscriber(self, message['body'], message['sender'], message['subject'], message['correlation_id'])
            except Exception:
                LOGGER.exception('broadcast subscriber %r failed', subscriber)

    # --- tasks -----------------------------------------------------------------------------------------------------

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self.task_queue(self._queue_name).task_send(task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        return self.task_queue(self._queue_name).add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        self.task_queue(self._queue_name).remove_task_subscriber(identifier)

    def task_queue(
        self, queue_name: str, prefetch_size: int | None = None, prefetch_count: int | None = None
    ) -> ProfileTaskQueue:
        """The task queue ``queue_name``; each of its methods goes where the mode of its call says."""
        if self._closed:
            raise kiwipy.CommunicatorClosed('the communicator is closed')
        encode_name(queue_name, 'a task queue name')
        with self._lock:
            if prefetch_count is not None or queue_name not in self._prefetch:
                self._prefetch[queue_name] = prefetch_count
        return ProfileTaskQueue(self, queue_name)

    def _send_task(self, queue_name: str, task: t.Any, no_reply: bool) -> kiwipy.Future | None:
        """Through the broker when one runs; else into its store, where the broker finds it when it starts.

        A task without a reply goes into the store whenever no broker runs, online or not: it is durable there at
        once, and a broker the daemon restarts finds it. One that expects a reply goes through the connection online;
        offline it is stored all the same (it runs when the daemon starts), but no broker means no one to carry the
        result back: the returned future fails with :class:`BrokerNotRunning` saying so (``verdi process repair``
        ignores it).
        """
        if self._closed:
            raise kiwipy.CommunicatorClosed('the communicator is closed')
        if no_reply and not self._broker_live():
            with contextlib.suppress(BrokerRunning):  # a broker is starting: through it, below
                self._store(queue_name, task)
                return None
        while self._open_mode() is Mode.OFFLINE:
            try:
                task_id = self._store(queue_name, task)
            except BrokerRunning:
                self._await_lock_or_broker()  # a broker is starting, or another submit is writing: look again
                continue
            if no_reply:
                return None
            break
        else:
            return self._online().task_queue(queue_name).task_send(task, no_reply=no_reply)
        future: kiwipy.Future = kiwipy.Future()
        future.set_exception(
            self._not_running(f'get the result of task {task_id} (it is stored and runs when the daemon starts)')
        )
        return future

    def _await_lock_or_broker(self, timeout: float = ANNOUNCE_TIMEOUT, interval: float = 0.02) -> None:
        """Wait (bounded) until the store's lock is free again or the broker that holds it announced itself.

        Polling: the holder is another process (a starting broker, an offline submit), with no event to wait on.
        """
        deadline = time.monotonic() + timeout
        while discovery.lock_held(self._data_dir) and discovery.read_live_broker_info(self._data_dir) is None:
            if time.monotonic() > deadline:
                raise BrokerRunning(
                    f'{self._data_dir} has been locked for {timeout:.0f}s by a process that is not a running broker: '
                    '`aiida-zmq status` shows who holds it'
                )
            time.sleep(interval)

    def _store(self, queue_name: str, task: t.Any) -> int:
        task_id = store.submit_offline(self._data_dir, queue_name, self._encoder(task), no_reply=True)
        LOGGER.debug('stored task %s in %s for when the broker starts', task_id, self._data_dir)
        return task_id


class ProfileTaskQueue:
    """A task queue of a :class:`ProfileCommunicator`: each call goes where its communicator's mode says."""

    def __init__(self, communicator: ProfileCommunicator, name: str) -> None:
        self._communicator = communicator
        self.name = name

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self._communicator._send_task(self.name, task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        """Online: the broker hands out tasks of the queue here once this returns. Offline: kept, live once online."""
        communicator = self._communicator
        identifier = shortuuid.uuid() if identifier is None else identifier
        with communicator._lock:
            mode = communicator._open_mode()
            subscribers = communicator._tasks.setdefault(self.name, {})
            if identifier in subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Task identifier '{identifier}'")
            if mode is Mode.ONLINE:
                prefetch = communicator._prefetch.get(self.name)
                queue = communicator._online().task_queue(self.name, prefetch_count=prefetch)
                queue.add_task_subscriber(_Delivered(communicator, subscriber), identifier)
                communicator._connected_tasks.setdefault(self.name, set()).add(identifier)
            else:
                communicator._out_of_sync = True
            subscribers[identifier] = subscriber
        return identifier

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        communicator = self._communicator
        with communicator._lock:
            mode = communicator._open_mode()
            if communicator._tasks.get(self.name, {}).pop(identifier, None) is None:
                raise ValueError(f"Unknown task subscriber '{identifier}'")
            connected = communicator._connected_tasks.get(self.name, set())
            if mode is Mode.ONLINE and identifier in connected:
                connected.discard(identifier)
                communicator._online().task_queue(self.name).remove_task_subscriber(identifier)
            elif identifier in connected:
                communicator._out_of_sync = True

    def _stored(self) -> OfflineTaskQueue:
        communicator = self._communicator
        return OfflineTaskQueue(communicator._data_dir, self.name, communicator._decoder)

    def __iter__(self) -> Iterator[t.Any]:
        """Online: the tasks the broker holds. Offline: the stored ones (``verdi process repair``)."""
        if self._communicator._open_mode() is Mode.ONLINE:
            yield from self._communicator._online().task_queue(self.name)
        else:
            yield from self._stored()

    @contextlib.contextmanager
    def next_task(self, no_ack: bool = False, fail: bool = True, timeout: float = 5.0) -> Iterator[t.Any]:
        """The next task of the queue, through the broker online, from the store offline.

        :raises kiwipy.QueueEmpty: when the queue has no task.
        """
        if self._communicator._open_mode() is Mode.ONLINE:
            with self._communicator._online().task_queue(self.name).next_task(no_ack, fail, timeout) as task:
                yield task
        else:
            with self._stored().next_task() as task:
                yield task
