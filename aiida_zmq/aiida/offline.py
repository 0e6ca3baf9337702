"""The communicator a profile gets while neither its daemon nor its broker runs.

AiiDA asks the broker for a communicator whenever it builds a runner, for ``submit()`` as well as for ``run()``. With
RabbitMQ that needs a server; with this broker it needs nothing:

* ``task_send(no_reply=True)`` (what ``submit()`` does) writes the task straight into the profile's task store with
  :func:`aiida_zmq.store.submit_offline`, under the broker's lock. The broker delivers it once it starts, that is on
  ``verdi daemon start``. If a broker holds the lock (it started meanwhile), the task is sent through it instead.
* subscribers (what ``run()`` registers for its processes) are kept in this process; broadcasts and RPCs addressed to
  them are delivered here, on a callback thread, as the broker would deliver them. So ``run()`` behaves as with a
  broker, without one.
* an RPC or broadcast for someone else (``verdi process kill`` of a daemon process) goes through the broker if one
  runs by now, else fails with :class:`BrokerNotRunning`, which says to start the daemon.
* ``task_queue(name)`` iterates the stored tasks (``verdi process repair``, which wants the daemon stopped).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import typing as t
from collections.abc import Callable, Iterator

import kiwipy
import shortuuid

from aiida_zmq import discovery, store
from aiida_zmq.exceptions import BrokerRunning

__all__ = ('BrokerNotRunning', 'OfflineCommunicator', 'OfflineTask', 'StoreFallbackCommunicator')

LOGGER = logging.getLogger(__name__)

# Seconds to wait for the broker.json of a broker that holds the lock but has not announced itself yet.
ANNOUNCE_TIMEOUT = 30.0


class BrokerNotRunning(kiwipy.UnroutableError):
    """The message needs a running broker (it is for a process of another interpreter), and none runs."""


Encoder = Callable[[t.Any], bytes]
Decoder = Callable[[bytes], t.Any]


class OfflineCommunicator(kiwipy.Communicator):
    """A :class:`kiwipy.Communicator` for a profile whose broker is not running; see the module docstring.

    :param connect: returns a started communicator to the broker once one runs (used when one appears meanwhile).
    """

    def __init__(
        self,
        *,
        data_dir: str,
        profile_name: str,
        task_queue: str,
        encoder: Encoder,
        decoder: Decoder,
        connect: Callable[[], kiwipy.Communicator],
    ) -> None:
        self._data_dir = data_dir
        self._profile_name = profile_name
        self._queue_name = task_queue
        self._encoder = encoder
        self._decoder = decoder
        self._connect = connect
        self._closed = False
        self._lock = threading.RLock()
        self._online: kiwipy.Communicator | None = None
        self._rpc_subscribers: dict[str, Callable] = {}
        self._broadcast_subscribers: dict[t.Any, Callable] = {}
        # Subscribers run on their own thread, as with a broker: never on the caller's (the runner's event loop).
        self._callbacks = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='aiida-zmq-offline')

    def __repr__(self) -> str:
        return f'<OfflineCommunicator profile={self._profile_name} data_dir={self._data_dir}>'

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            online, self._online = self._online, None
        if online is not None:
            online.close()
        self._callbacks.shutdown(wait=False, cancel_futures=True)

    def _ensure_open(self) -> None:
        if self._closed:
            raise kiwipy.CommunicatorClosed('the communicator is closed')

    def _not_running(self, what: str) -> BrokerNotRunning:
        return BrokerNotRunning(
            f'cannot {what}: the broker of profile `{self._profile_name}` is not running. It runs with the daemon: '
            f'start it with `verdi -p {self._profile_name} daemon start` (submitting works without it, the task '
            'waits in the store).'
        )

    def online(self, wait: bool = True) -> kiwipy.Communicator | None:
        """Return a communicator to the profile's broker if one runs now (connecting once), else ``None``.

        :param wait: whether to wait for a broker that holds the lock but has not written ``broker.json`` yet.
        """
        with self._lock:
            if self._online is not None and not self._online.is_closed():
                return self._online
            info = discovery.read_live_broker_info(self._data_dir)
            if info is None and wait and _lock_held(self._data_dir):
                info = discovery.wait_for_broker_info(self._data_dir, ANNOUNCE_TIMEOUT)
            if info is None:
                return None
            LOGGER.info('a broker runs for `%s` now (pid %s): connecting to it', self._profile_name, info.get('pid'))
            self._online = self._connect()
            return self._online

    # --- tasks -----------------------------------------------------------------------------------------------------

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self.task_queue(self._queue_name).task_send(task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        raise self._not_running('consume tasks')

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        raise ValueError(f"Unknown task subscriber '{identifier}'")

    def task_queue(
        self, queue_name: str, prefetch_size: int | None = None, prefetch_count: int | None = None
    ) -> OfflineTaskQueue:
        self._ensure_open()
        return OfflineTaskQueue(self, queue_name)

    def _send_task(self, queue_name: str, task: t.Any, no_reply: bool) -> kiwipy.Future | None:
        """Store the task for the broker's next start, or send it through a broker that runs by now.

        A task that expects a reply is stored all the same (it runs when the daemon starts), but no broker means no
        one to carry the result back: the returned future fails with :class:`BrokerNotRunning` saying so. AiiDA's
        ``submit()`` asks for no reply; ``verdi process repair`` ignores the future.
        """
        self._ensure_open()
        online = self._online if self._online is not None and not self._online.is_closed() else None
        if online is None:
            payload = self._encoder(task)
            try:
                task_id = store.submit_offline(self._data_dir, queue_name, payload, no_reply=True)
            except BrokerRunning:
                LOGGER.debug('a broker holds %s: sending the task through it', self._data_dir)
                online = self.online()
                if online is None:  # the broker stopped again between the two looks: its lock is free now
                    task_id = store.submit_offline(self._data_dir, queue_name, payload, no_reply=True)
                    return self._stored(task_id, no_reply)
            else:
                return self._stored(task_id, no_reply)
        if queue_name == self._queue_name:
            return online.task_send(task, no_reply=no_reply)
        return t.cast(t.Any, online).task_queue(queue_name).task_send(task, no_reply=no_reply)

    def _stored(self, task_id: int, no_reply: bool) -> kiwipy.Future | None:
        LOGGER.debug('stored task %s in %s for when the broker starts', task_id, self._data_dir)
        if no_reply:
            return None
        future: kiwipy.Future = kiwipy.Future()
        future.set_exception(
            self._not_running(f'get the result of task {task_id} (it is stored and runs when the daemon starts)')
        )
        return future

    # --- RPC -------------------------------------------------------------------------------------------------------

    def add_rpc_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        self._ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        with self._lock:
            if str(identifier) in self._rpc_subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"RPC identifier '{identifier}'")
            self._rpc_subscribers[str(identifier)] = subscriber
        return identifier

    def remove_rpc_subscriber(self, identifier: t.Any) -> None:
        with self._lock:
            if self._rpc_subscribers.pop(str(identifier), None) is None:
                raise ValueError(f"Unknown subscriber '{identifier}'")

    def rpc_send(self, recipient_id: t.Any, msg: t.Any) -> kiwipy.Future:
        self._ensure_open()
        with self._lock:
            subscriber = self._rpc_subscribers.get(str(recipient_id))
        if subscriber is None:
            online = self.online()
            if online is None:
                raise self._not_running(f'send an RPC to `{recipient_id}`')
            return online.rpc_send(recipient_id, msg)
        future: kiwipy.Future = kiwipy.Future()
        # Through the codec, as a broker would: the subscriber gets a copy, never the sender's objects.
        payload = self._encoder(msg)
        self._callbacks.submit(self._run_rpc, subscriber, payload, future)
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
            _set_decoded(future, self._encoder, self._decoder, result)

    # --- broadcasts ------------------------------------------------------------------------------------------------

    def add_broadcast_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        self._ensure_open()
        identifier = shortuuid.uuid() if identifier is None else identifier
        with self._lock:
            if identifier in self._broadcast_subscribers:
                raise kiwipy.DuplicateSubscriberIdentifier(f"Broadcast identifier '{identifier}'")
            self._broadcast_subscribers[identifier] = subscriber
        return identifier

    def remove_broadcast_subscriber(self, identifier: t.Any) -> None:
        with self._lock:
            if self._broadcast_subscribers.pop(identifier, None) is None:
                raise ValueError(f"Broadcast subscriber '{identifier}' unknown")

    def broadcast_send(
        self, body: t.Any, sender: t.Any = None, subject: t.Any = None, correlation_id: t.Any = None
    ) -> bool:
        """Deliver to this process's subscribers, and through the broker when one runs by now.

        Without a broker there is no one else to tell: the daemon is stopped, and a process run elsewhere learns of a
        state change by polling the database, as it does after a missed broadcast.
        """
        self._ensure_open()
        online = self.online(wait=False)
        if online is not None:
            return online.broadcast_send(body, sender=sender, subject=subject, correlation_id=correlation_id)
        message = self._encoder({'body': body, 'sender': sender, 'subject': subject, 'correlation_id': correlation_id})
        self._callbacks.submit(self._run_broadcast, message)
        return True

    def _run_broadcast(self, payload: bytes) -> None:
        with self._lock:
            subscribers = list(self._broadcast_subscribers.values())
        for subscriber in subscribers:
            message = self._decoder(payload)
            try:
                subscriber(self, message['body'], message['sender'], message['subject'], message['correlation_id'])
            except Exception:
                LOGGER.exception('broadcast subscriber %r failed', subscriber)


def _set_decoded(future: kiwipy.Future, encoder: Encoder, decoder: Decoder, result: t.Any) -> None:
    try:
        future.set_result(decoder(encoder(result)))
    except Exception as exception:
        future.set_exception(exception)


def _lock_held(data_dir: str) -> bool:
    """Whether someone (a starting broker) holds the data directory's lock right now."""
    try:
        with store.broker_lock(data_dir, blocking=False):
            return False
    except BrokerRunning:
        return True
    except OSError:
        return False


class OfflineTaskQueue:
    """A task queue of the offline communicator: send to it, or go through its stored tasks."""

    def __init__(self, communicator: OfflineCommunicator, name: str) -> None:
        self._communicator = communicator
        self.name = name

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self._communicator._send_task(self.name, task, no_reply)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        return self._communicator.add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        self._communicator.remove_task_subscriber(identifier)

    def __iter__(self) -> Iterator[OfflineTask]:
        """Go through the stored tasks of this queue, holding the broker's lock meanwhile.

        Tasks waiting to be delivered and tasks that were handed out when the broker last stopped (the broker hands
        those out again when it starts) both count: both will run. A task whose ``processing()`` outcome is set is
        deleted, as an acknowledged task is.

        :raises BrokerNotRunning: never; but :class:`aiida_zmq.exceptions.BrokerRunning` when a broker runs (then go
            through the broker: stop the daemon first, as ``verdi process repair`` asks).
        """
        communicator = self._communicator
        communicator._ensure_open()
        with store.broker_lock(communicator._data_dir, blocking=False):
            task_store = store.TaskStore(store.ensure_private_dir(communicator._data_dir) / store.STORE_FILENAME)
            try:
                stored = [task for task in task_store.load_delivered() if task.queue == self.name]
                after = 0
                while True:
                    batch = task_store.load_ready(self.name, after, 1000)
                    if not batch:
                        break
                    stored.extend(batch)
                    after = batch[-1].id
                stored.sort(key=lambda task: task.id)
                for task in stored:
                    offline_task = OfflineTask(task.id, task.payload, communicator._decoder)
                    yield offline_task
                    if offline_task.acknowledged:
                        task_store.delete([task.id])
                        task_store.commit()
            finally:
                task_store.close()

    def next_task(self, no_ack: bool = False, fail: bool = True, timeout: float = 5.0) -> t.Any:
        raise NotImplementedError('iterate over the offline queue instead (`for task in queue`)')


class OfflineTask:
    """A stored task seen while its broker is not running."""

    def __init__(self, task_id: int, payload: bytes, decoder: Decoder) -> None:
        self.task_id = task_id
        self._payload = payload
        self._decoder = decoder
        self.acknowledged = False
        self.no_reply = True

    @property
    def body(self) -> t.Any:
        return self._decoder(self._payload)

    @contextlib.contextmanager
    def processing(self) -> Iterator[kiwipy.Future]:
        """Process the task inside the block: when its outcome is set, the task is removed from the store."""
        outcome: kiwipy.Future = kiwipy.Future()
        try:
            yield outcome
        except Exception as exception:
            if not outcome.done():
                outcome.set_exception(exception)
            raise
        finally:
            self.acknowledged = outcome.done() and not outcome.cancelled()


class StoreFallbackCommunicator(kiwipy.Communicator):
    """A profile's communicator to its running broker, that works on as an offline one once the broker is gone.

    A client that connected while the daemon ran (a Jupyter session) would otherwise, after ``verdi daemon stop``,
    wait a minute for every confirmation no broker will give: ``submit()`` registers the new process as an RPC
    subscriber and sends its task. So before such a call the broker's ``broker.json`` and pid are checked (a file
    read), and with the broker gone the call goes to an :class:`OfflineCommunicator`: the task into the store, the
    subscriber kept in this process. Subscriptions made while the broker ran stay with the connection, which
    registers them again when a broker is back.

    A daemon worker (it consumes tasks) keeps everything but its task sends on the connection, which replays
    subscriptions and queued messages after the broker restarts: a process it runs must stay reachable. Only the tasks
    it sends (children it submits) take the store while the broker is gone.
    """

    def __init__(
        self,
        communicator: kiwipy.Communicator,
        *,
        data_dir: str,
        profile_name: str,
        task_queue: str,
        encoder: Encoder,
        decoder: Decoder,
    ) -> None:
        self._communicator = communicator
        self._data_dir = data_dir
        self._consumer = False
        self._offline = OfflineCommunicator(
            data_dir=data_dir,
            profile_name=profile_name,
            task_queue=task_queue,
            encoder=encoder,
            decoder=decoder,
            connect=lambda: communicator,
        )

    def __getattr__(self, name: str) -> t.Any:
        # ``admin``, ``task_queue``, ``endpoint``...: what the wrapped communicator offers beyond kiwipy's interface.
        return getattr(self._communicator, name)

    def __repr__(self) -> str:
        return f'<StoreFallbackCommunicator {self._communicator!r}>'

    @property
    def wrapped(self) -> kiwipy.Communicator:
        return self._communicator

    def _broker_gone(self) -> bool:
        return discovery.read_live_broker_info(self._data_dir) is None

    def _local(self) -> bool:
        """Whether a call other than ``task_send`` goes to the offline side: not a worker, and the broker is gone."""
        return not self._consumer and self._broker_gone()

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        if self._broker_gone():
            return self._offline.task_send(task, no_reply=no_reply)
        return self._communicator.task_send(task, no_reply=no_reply)

    def is_closed(self) -> bool:
        return self._communicator.is_closed()

    def close(self) -> None:
        self._offline.close()
        self._communicator.close()

    def add_rpc_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        if self._local():
            return self._offline.add_rpc_subscriber(subscriber, identifier)
        return self._communicator.add_rpc_subscriber(subscriber, identifier)

    def remove_rpc_subscriber(self, identifier: t.Any) -> None:
        try:
            self._offline.remove_rpc_subscriber(identifier)
        except ValueError:
            self._communicator.remove_rpc_subscriber(identifier)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        self._consumer = True
        return self._communicator.add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        self._communicator.remove_task_subscriber(identifier)

    def add_broadcast_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        if self._local():
            return self._offline.add_broadcast_subscriber(subscriber, identifier)
        return self._communicator.add_broadcast_subscriber(subscriber, identifier)

    def remove_broadcast_subscriber(self, identifier: t.Any) -> None:
        try:
            self._offline.remove_broadcast_subscriber(identifier)
        except ValueError:
            self._communicator.remove_broadcast_subscriber(identifier)

    def rpc_send(self, recipient_id: t.Any, msg: t.Any) -> kiwipy.Future:
        if self._local():
            return self._offline.rpc_send(recipient_id, msg)
        return self._communicator.rpc_send(recipient_id, msg)

    def broadcast_send(
        self, body: t.Any, sender: t.Any = None, subject: t.Any = None, correlation_id: t.Any = None
    ) -> bool:
        if self._local():
            return self._offline.broadcast_send(body, sender=sender, subject=subject, correlation_id=correlation_id)
        return self._communicator.broadcast_send(body, sender=sender, subject=subject, correlation_id=correlation_id)
