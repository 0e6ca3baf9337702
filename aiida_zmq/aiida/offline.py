"""A profile's communicator while no broker runs: kiwipy's ``LocalCommunicator``, with the broker's store for tasks.

:class:`OfflineCommunicator` is the offline side of :class:`aiida_zmq.aiida.communicator.ProfileCommunicator`, in the
shape of kiwipy's ``LocalCommunicator`` over ``CommunicatorHelper``: its subscribers are the profile's one registry
(:class:`aiida_zmq.subscribers.Subscribers`, shared with the connection to the broker once there is one), and
messages for them are delivered here, on a thread of this communicator (what ``run()`` needs for its own processes),
never on the caller's. An RPC for anyone else fails at once with :class:`BrokerNotRunning`, which says to start the
daemon. Tasks go into the broker's store (:func:`aiida_zmq.store.submit_offline`), where the broker finds them when
the daemon starts, and a task queue is read from the store (:class:`OfflineTaskQueue`, ``verdi process repair``):
every read happens under the broker's lock, so a broker that starts meanwhile waits for it, and a running broker makes
it raise :class:`aiida_zmq.exceptions.BrokerRunning` (go through the broker then).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import kiwipy
import shortuuid

from aiida_zmq import discovery, store
from aiida_zmq.exceptions import BrokerNotRunning, BrokerRunning
from aiida_zmq.subscribers import Subscribers

__all__ = ('ANNOUNCE_TIMEOUT', 'BrokerNotRunning', 'OfflineCommunicator', 'OfflineTask', 'OfflineTaskQueue')

LOGGER = logging.getLogger(__name__)

Encoder = Callable[[t.Any], bytes]
Decoder = Callable[[bytes], t.Any]

#: Seconds to wait for a broker that holds the store's lock to announce itself (it binds, then writes broker.json).
ANNOUNCE_TIMEOUT = 30.0


class OfflineCommunicator(kiwipy.Communicator):
    """See the module docstring. Subscribers are called with the registry's communicator (the profile's)."""

    def __init__(
        self,
        subscribers: Subscribers,
        *,
        data_dir: str,
        profile_name: str,
        task_queue: str,
        encoder: Encoder,
        decoder: Decoder,
    ) -> None:
        self.subscribers = subscribers
        self.data_dir = data_dir
        self._profile_name = profile_name
        self._queue_name = task_queue
        self._encoder = encoder
        self._decoder = decoder
        self._closed = False
        self._queues: dict[str, OfflineTaskQueue] = {}  # one per name (dict operations are atomic: any thread)
        # Deliveries run here, as a broker's would on the connection's threads: never on the caller's.
        self._local = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='aiida-zmq-offline')

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._local.shutdown(wait=False, cancel_futures=True)

    def not_running(self, what: str) -> BrokerNotRunning:
        return BrokerNotRunning(
            f'cannot {what}: the broker of profile `{self._profile_name}` is not running. It runs with the daemon: '
            f'start it with `verdi -p {self._profile_name} daemon start` (submitting works without it, the task '
            'waits in the store).'
        )

    # Subscribers: kept in the registry, live once a broker runs ---------------------------------------------------

    def add_rpc_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        identifier = shortuuid.uuid() if identifier is None else identifier
        self.subscribers.add_rpc(str(identifier), subscriber)
        return identifier

    def remove_rpc_subscriber(self, identifier: t.Any) -> None:
        self.subscribers.remove_rpc(str(identifier))

    def add_broadcast_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        identifier = shortuuid.uuid() if identifier is None else identifier
        self.subscribers.add_broadcast(identifier, subscriber)
        return identifier

    def remove_broadcast_subscriber(self, identifier: t.Any) -> None:
        self.subscribers.remove_broadcast(identifier)

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        return self.task_queue(self._queue_name).add_task_subscriber(subscriber, identifier)

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        self.task_queue(self._queue_name).remove_task_subscriber(identifier)

    # Messages: delivered here, or stored --------------------------------------------------------------------------

    def rpc_send(self, recipient_id: t.Any, msg: t.Any) -> kiwipy.Future:
        """To a subscriber of this communicator, else :class:`BrokerNotRunning` at once (nobody can receive it)."""
        subscriber = self.subscribers.rpc(str(recipient_id))
        if subscriber is None:
            raise self.not_running(f'send an RPC to `{recipient_id}`')
        future: kiwipy.Future = kiwipy.Future()
        # Through the codec, as a broker would: the subscriber gets a copy, never the sender's objects.
        self._local.submit(self._run_rpc, subscriber, self._encoder(msg), future)
        return future

    def _run_rpc(self, subscriber: Callable, payload: bytes, future: kiwipy.Future) -> None:
        try:
            result = subscriber(self.subscribers.communicator, self._decoder(payload))
        except Exception as exception:
            future.set_exception(kiwipy.RemoteException(f'{type(exception).__name__}: {exception}'))
            return
        if isinstance(result, concurrent.futures.Future):
            kiwipy.chain(result, future)
        else:
            with kiwipy.capture_exceptions(future):
                future.set_result(self._decoder(self._encoder(result)))

    def broadcast_send(
        self, body: t.Any, sender: t.Any = None, subject: t.Any = None, correlation_id: t.Any = None
    ) -> bool:
        """To this communicator's subscribers: with the daemon stopped there is no one else to tell (a process run
        elsewhere learns of a state change by polling the database, as it does after a missed broadcast)."""
        message = self._encoder({'body': body, 'sender': sender, 'subject': subject, 'correlation_id': correlation_id})
        self._local.submit(self._run_broadcast, message)
        return True

    def _run_broadcast(self, payload: bytes) -> None:
        message = self._decoder(payload)
        communicator = self.subscribers.communicator
        for subscriber in self.subscribers.broadcast_subscribers():
            try:
                subscriber(
                    communicator, message['body'], message['sender'], message['subject'], message['correlation_id']
                )
            except Exception:
                LOGGER.exception('broadcast subscriber %r failed', subscriber)

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        return self.task_queue(self._queue_name).task_send(task, no_reply)

    def task_queue(
        self, queue_name: str, prefetch_size: int | None = None, prefetch_count: int | None = None
    ) -> OfflineTaskQueue:
        queue = self._queues.get(queue_name)
        if queue is None:
            queue = self._queues.setdefault(queue_name, OfflineTaskQueue(self, queue_name))
        return queue

    def store(self, queue_name: str, task: t.Any) -> int:
        """Write ``task`` into the broker's store for when it starts; return its id.

        :raises BrokerRunning: when a broker (or another writer) holds the store's lock.
        """
        task_id = store.submit_offline(self.data_dir, queue_name, self._encoder(task), no_reply=True)
        LOGGER.debug('stored task %s in %s for when the broker starts', task_id, self.data_dir)
        return task_id

    def await_lock_or_broker(self, timeout: float = ANNOUNCE_TIMEOUT, interval: float = 0.02) -> None:
        """Wait (bounded) until the store's lock is free again or the broker that holds it announced itself.

        Polling: the holder is another process (a starting broker, an offline submit), with no event to wait on.
        """
        deadline = time.monotonic() + timeout
        while discovery.lock_held(self.data_dir) and discovery.read_live_broker_info(self.data_dir) is None:
            if time.monotonic() > deadline:
                raise BrokerRunning(
                    f'{self.data_dir} has been locked for {timeout:.0f}s by a process that is not a running broker: '
                    '`aiida-zmq status` shows who holds it'
                )
            time.sleep(interval)

    def decode(self, payload: bytes) -> t.Any:
        return self._decoder(payload)


class OfflineTaskQueue:
    """A task queue of a broker that is not running: its subscribers in the registry, its tasks in the store."""

    def __init__(self, communicator: OfflineCommunicator, name: str) -> None:
        self._communicator = communicator
        self._data_dir = Path(communicator.data_dir)
        self.name = name

    def task_send(self, task: t.Any, no_reply: bool = False) -> kiwipy.Future | None:
        """Into the store (it runs when the daemon starts). No broker means no one to carry a result back: a task that
        wants one is stored all the same, and the returned future fails with :class:`BrokerNotRunning` saying so.

        :raises BrokerRunning: when a broker (or another writer) holds the store's lock.
        """
        task_id = self._communicator.store(self.name, task)
        if no_reply:
            return None
        future: kiwipy.Future = kiwipy.Future()
        future.set_exception(
            self._communicator.not_running(
                f'get the result of task {task_id} (it is stored and runs when the daemon starts)'
            )
        )
        return future

    def add_task_subscriber(self, subscriber: Callable, identifier: t.Any = None) -> t.Any:
        identifier = shortuuid.uuid() if identifier is None else identifier
        self._communicator.subscribers.add_task(self.name, identifier, subscriber)
        return identifier

    def remove_task_subscriber(self, identifier: t.Any) -> None:
        self._communicator.subscribers.remove_task(self.name, identifier)

    def __iter__(self) -> Iterator[OfflineTask]:
        """Go through the stored tasks of this queue, oldest first, holding the broker's lock meanwhile.

        Tasks waiting to be delivered and tasks that were handed out when the broker last stopped (it hands those out
        again when it starts) both count: both will run. A task whose ``processing()`` outcome is set is deleted, as
        an acknowledged task is. A broker that never ran has no store: no tasks, and nothing is created.

        :raises aiida_zmq.exceptions.BrokerRunning: when a broker runs (go through it instead).
        """
        with self._store() as task_store:
            if task_store is None:
                return
            for task in self._load(task_store):
                offline_task = OfflineTask(task.id, task.payload, self._communicator.decode)
                yield offline_task
                self._finish(task_store, offline_task)

    @contextlib.contextmanager
    def next_task(self, no_ack: bool = False, fail: bool = True, timeout: float = 5.0) -> Iterator[OfflineTask]:
        """The oldest stored task; processed inside the block (outcome set), it is deleted.

        :raises kiwipy.QueueEmpty: when the queue has no stored task.
        """
        with self._store() as task_store:
            stored = self._load(task_store) if task_store is not None else []
            if not stored:
                raise kiwipy.QueueEmpty(f"the queue '{self.name}' has no stored task")
            task = OfflineTask(stored[0].id, stored[0].payload, self._communicator.decode)
            yield task
            assert task_store is not None
            self._finish(task_store, task)

    @contextlib.contextmanager
    def _store(self) -> Iterator[store.TaskStore | None]:
        """The store under the broker's lock; ``None`` when there is none (the broker never ran)."""
        path = self._data_dir / store.STORE_FILENAME
        if not path.exists():
            yield None
            return
        with store.broker_lock(self._data_dir, blocking=False):
            task_store = store.TaskStore(path)
            try:
                yield task_store
            finally:
                task_store.close()

    def _load(self, task_store: store.TaskStore) -> list[store.StoredTask]:
        stored = [task for task in task_store.load_delivered() if task.queue == self.name]
        after = 0
        while True:
            batch = task_store.load_ready(self.name, after, 1000)
            if not batch:
                break
            stored.extend(batch)
            after = batch[-1].id
        return sorted(stored, key=lambda task: task.id)

    @staticmethod
    def _finish(task_store: store.TaskStore, task: OfflineTask) -> None:
        if task.acknowledged:
            task_store.delete([task.task_id])
            task_store.commit()


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
