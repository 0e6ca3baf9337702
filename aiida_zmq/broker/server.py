"""The broker: its lifecycle, the poll loop and the batch.

One thread runs one poll loop. Each turn of the loop is a batch: it reads what the sockets have (up to
``batch_size`` messages), hands each to its handler (``handlers/``, one table), commits the store once (group
commit), then sends the confirms that waited for that commit and hands ready tasks to consumers with room for them.
The broker never blocks on a peer: every send is non-blocking, what a peer cannot take yet waits in that peer's
outbound queue (bounded in bytes and messages), a peer with messages waiting gets no deliveries, and one that cannot
take what must reach it, or takes nothing for the peer timeout, loses its session and its tasks to the others (the
slow-client rule, ``docs/protocol.md``, Limits).

This module imports nothing from AiiDA: payloads are opaque bytes. The handlers and the ADMIN operations see the
broker as a :class:`~aiida_zmq.broker.context.Context`; they never import this module.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from .. import protocol
from ..exceptions import BadArgument, StoreError
from ..protocol import Command, ErrorCode
from ..ratelimit import RateLimitedLog
from ..security import ensure_private_dir
from ..store import STORE_FILENAME, TaskStore
from ..store_history import BROKER_LIMITS
from ..store_identity import StoreIdentity
from .config import BrokerConfig
from .context import Batch, Peer
from .datadir import DataDirectory, default_endpoint
from .deliveries import Deliveries
from .descriptors import raise_soft_limit
from .handlers import HANDLERS, session, tasks
from .handlers import admin as admin_handlers
from .intake import Intake
from .liveness import ListeningClock
from .peers import Client, Outbound, Sender
from .queues import QueueState, TaskQueues
from .rpc_routes import RpcRoutes
from .sessions import Sessions
from .store_fault import StoreFault

__all__ = ('Broker', 'BrokerConfig', 'default_endpoint')

LOGGER = logging.getLogger(__name__)

# The broker gives free heap memory back to the system this often (and a second after a large release).
TRIM_INTERVAL = 5.0


def trim_heap() -> None:
    """Hand the heap's free pages back to the system. glibc keeps freed memory for reuse, so a broker that buffered
    a flood for a client that did not read stayed at 1.2-1.5 GiB after every client left; ``malloc_trim(0)`` returns
    it (all arenas, ZeroMQ's I/O thread's included). A no-op where the C library has no such call."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
    function.argtypes = [ctypes.c_size_t]
    return function


_MALLOC_TRIM = _find_malloc_trim()


class HeapTrim:
    """When to hand freed heap memory back to the system: every TRIM_INTERVAL, or a second after much was freed."""

    def __init__(self) -> None:
        self._memory_freed = False
        self._last_trim = 0.0

    def tick(self, now: float, memory_freed: bool) -> None:
        self._memory_freed |= memory_freed
        if now - self._last_trim >= (1.0 if self._memory_freed else TRIM_INTERVAL):
            # After a flood the freed memory stays with the process unless it is handed back (1.2 GiB did).
            self._memory_freed = False
            self._last_trim = now
            trim_heap()


# --------------------------------------------------------------------------------------------------------------------
# The broker


class Broker:
    """The aiida-zmq broker. Run it with :meth:`serve_forever` (the ``aiida-zmq serve`` command) or, in tests,
    :meth:`start_in_thread`."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        binds: Sequence[str] = (),
        config: BrokerConfig | None = None,
    ) -> None:
        self.data_dir = ensure_private_dir(data_dir)
        self.config = config or BrokerConfig()
        self.endpoints = list(binds) or [default_endpoint(self.data_dir)]
        self.epoch = secrets.token_hex(8)
        self.started = time.time()
        # Every line a peer can make the broker repeat goes through this, keyed by (kind, peer): a flood of malformed
        # messages writes a few lines and a count, not a line each (1.1 million lines, 154 MiB in 20 s, before).
        self.limited_log = RateLimitedLog(LOGGER, burst=5, interval=self.config.log_interval, max_keys=1000)
        self.directory = DataDirectory(
            self.data_dir, self.endpoints, self.config, epoch=self.epoch, started=self.started, log=self.limited_log
        )
        self._store: TaskStore | None = None
        self._identity: StoreIdentity | None = None
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

        self.clients: dict[bytes, Client] = {}
        self.sessions = Sessions(self.clients)
        self.queues = TaskQueues(self.config)
        self.rpc = RpcRoutes(self.config)
        self.batch = Batch()  # what this turn did that waits for its commit
        self.trim = HeapTrim()  # gives freed memory back to the system
        self._dispatch_more = False  # the last dispatch left work for a consumer that had its burst
        self.store_fault = StoreFault(self.config.store_retry, self.config.store_retry_max)
        self.stats = collections.Counter[str]()
        # Peers' silence and the reclaim grace are counted in time the broker spent listening (liveness.py).
        self.listening = ListeningClock(self.config.heartbeat, self.config.peer_timeout)
        self.deliveries = Deliveries(self.config, self.queues, self.stats, self.limited_log)
        self.outbound = Outbound(self.config, self.stats, self.limited_log, self.queues.wake, self.listening)
        self.intake = Intake(self.config, self.stats, self.limited_log)

    # Lifecycle ----------------------------------------------------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        assert self._store is not None, 'the broker is not started'
        return self._store

    def open(self) -> None:
        """Take the data directory's lock, load the store and bind the sockets."""
        raise_soft_limit()  # before any connection: libzmq aborts the process when accept() runs out of descriptors
        try:
            self.directory.take_lock()
            self.directory.check_binds()  # before the store is touched: a bad --bind changes nothing
            store_path = self.data_dir / STORE_FILENAME
            # Refuse a store that is not the one the broker left (truncated, its -wal lost, another file).
            self._identity = StoreIdentity(self.data_dir)
            self._identity.check_before_open()
            self._store = TaskStore(store_path, fsync=self.config.fsync, history=self.config.task_history)
            self._store.history.limits = BROKER_LIMITS
            self._identity.verify_and_adopt(self._store)
            for path in self.data_dir.glob(STORE_FILENAME + '*'):  # the store and SQLite's -wal and -shm beside it
                os.chmod(path, 0o600)
            for queue, count in self.store.ready_counts().items():
                self.queues[queue] = QueueState(queue, backlog=count)
            self.deliveries.open(self._store, self.listening.now)
            self.directory.bind()
            self.directory.write_info()
        except BaseException:
            self.close()
            raise
        depth = sum(len(queue) for queue in self.queues.values())
        LOGGER.info(
            'broker %s ready on %s: %d queued task(s) in %d queue(s), %d awaiting reclaim (pid %d)',
            self.epoch,
            ', '.join(self.endpoints),
            depth,
            len(self.queues),
            len(self.deliveries.orphans),
            os.getpid(),
        )

    def close(self) -> None:
        """Remove ``broker.json``, commit, close store and sockets, release the lock.

        ``broker.json`` goes first: from then on this broker no longer serves, and a broker starting meanwhile waits
        for the lock instead of being refused as a second broker. The lock goes last, after the store is closed.
        """
        self.directory.withdraw_info()
        if self._store is not None:
            try:
                self._flush_writes()
                self._store.close()
            except StoreError:
                LOGGER.exception('could not commit the last batch on shutdown')
            self._store = None
            self.deliveries.close()
        if self._identity is not None:
            self._identity.close()
            self._identity = None
        self.directory.release()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to finish its batch and stop; waits for a loop running in a thread."""
        self._stop_requested.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def start_in_thread(self) -> Broker:
        """Open the broker and run its loop in a daemon thread (for tests and embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name='aiida-zmq-broker', daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError('the broker did not become ready within 30 s')
        if self._store is None:
            raise RuntimeError('the broker failed to start; see the log')
        return self

    def serve_forever(self, install_signal_handlers: bool = False) -> None:
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop_requested.set())
        try:
            self.open()
        finally:
            self._ready.set()
        try:
            self._loop()
        finally:
            LOGGER.info('broker %s stopping: %s', self.epoch, dict(self.stats))
            self.close()

    # The loop -----------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        for socket in self.directory.sockets:
            poller.register(socket, zmq.POLLIN)
        heartbeat = self.config.heartbeat
        next_tick = time.monotonic() + heartbeat
        batch_size = self.config.batch_size
        while not self._stop_requested.is_set():
            now = time.monotonic()
            timeout = max(0.0, next_tick - now)
            due = self.deliveries.next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, due - now))
            if self._dispatch_more:
                timeout = 0.0  # a consumer had its burst and there is more for it: the next turn at once
            if self.outbound.backlogged:
                timeout = min(timeout, 0.01)
            # Wake at least every 100 ms so that a stop request is seen promptly.
            events = poller.poll(int(min(timeout, 0.1) * 1000))
            self.listening.turn()  # what peers sent until now is read in this turn
            for socket, _ in events:
                budget = batch_size
                while budget > 0:
                    try:
                        frames, cost = self.intake.receive(socket)
                    except zmq.Again:
                        break
                    budget -= cost
                    if frames is not None:
                        self._handle(socket, frames)
            self._end_of_batch()
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + heartbeat

    # The batch ----------------------------------------------------------------------------------------------------

    def _end_of_batch(self) -> None:
        """Hand out ready tasks, commit the batch (stores and deliveries in one transaction), then confirm what it
        stored and send the deliveries: nothing leaves before the commit that records it."""
        batch = self.batch
        self.deliveries.release_due(time.monotonic())
        if self.outbound.overflowed:
            self._drop_overflowed()  # before the dispatch: their tasks go to the others in this batch
        writable = self.store_fault.writable()
        self._dispatch_more = False
        if not writable and not batch.inserted:
            # The store failed and its next try is not due: no deliveries (they need a commit), no commit; what the
            # batch did waits in memory. Heartbeats and ADMIN are answered all the same.
            self._answer_admin_replies_with_fault()
            self.outbound.flush()
            return
        if writable:  # (a batch with new tasks tries the store early: the senders asked, and it may have room now)
            try:
                self._dispatch_more = tasks.hand_out(self)
            except StoreError:
                pass  # the store failed reading a queue's next page: the batch is lost, its commit below says so
        if not self._commit():
            return
        self._send_confirms()
        for client, correlation, response in batch.admin_replies:
            self.send(client, Command.ADMIN_REPLY, correlation, b'ok', response)
        batch.admin_replies.clear()
        for client, task, command, first in batch.outgoing:
            tasks.send_delivery(self, client, task, command, first)
        batch.outgoing.clear()
        self.outbound.flush()

    def _send_confirms(self) -> None:
        """Confirms first: the senders wait for them (consumers, woken first, would take the CPU from them). A sender
        whose task this batch delivers to its own session (to a subscriber, not to a TASK_GET) learns it from the
        confirm (``held_here``; the delivery goes out next) and waits for its subscriber, the order RabbitMQ gives."""
        batch = self.batch
        if not batch.confirms:
            return
        delivered = {
            (client.routing_id, task.id)
            for client, task, command, _ in batch.outgoing
            if command is Command.TASK_DELIVER
        }
        for peer, correlation, task_id, session_id in batch.confirms:
            held_here = (session_id, task_id) in delivered
            self.answer(peer, Command.TASK_CONFIRM, correlation, protocol.number(task_id), protocol.flag(held_here))
        batch.confirms.clear()

    def _commit(self) -> bool:
        try:
            # Synced when someone waits for it: a confirm, an ADMIN answer. Acks and deliveries ride on the next one.
            written = self.store.commit(sync=bool(self.batch.confirms or self.batch.admin_replies))
        except StoreError as exception:
            self._batch_failed(exception)
            return False
        if written:
            self.stats['commits'] += 1  # `aiida-zmq top` shows the commit rate
        self.batch.inserted.clear()
        if self.store_fault.current is not None and (written or not self.store.staged):
            fault = self.store_fault.recovered()
            assert fault is not None
            LOGGER.warning(
                'the task store writes again (%s since %s): tasks are accepted and delivered',
                fault['kind'],
                time.strftime('%H:%M:%S', time.localtime(fault['since'])),
            )
        return True

    # The store failing (see store_fault.py): new tasks are refused, the rest waits in memory for the next try.

    def _answer_admin_replies_with_fault(self) -> None:
        text = self.store_fault.text(self.data_dir)
        for client, correlation, _ in self.batch.admin_replies:
            admin_handlers.error(self, client, correlation, f'done in the broker, not stored yet: {text}')
        self.batch.admin_replies.clear()

    def _batch_failed(self, exception: StoreError) -> None:
        """Nothing of this batch is stored. Its new tasks are refused (loudly, never confirmed) and forgotten; its
        deliveries were not sent, so their tasks are back in their queues; everything else the batch changed (acks,
        requeues, dead letters) stays as the broker holds it in memory and is written with the next commit."""
        batch = self.batch
        self.store_fault.failed(exception)
        self.stats['store_failures'] += 1
        self.limited_log.error(
            '%s; refusing the tasks of this batch, trying again in %.1fs',
            exception,
            self.store_fault.backoff,
            key=('store',),
        )
        inserted = {task.id: task for task in batch.inserted}
        batch.inserted.clear()
        self.store.unstage(inserted)  # their ids are free again: the next insert may reuse them
        for peer, correlation, _, _ in batch.confirms:
            self.answer(peer, Command.ERROR, correlation, ErrorCode.STORE, str(exception).encode())
        batch.confirms.clear()
        for client, task, command, first in batch.outgoing:
            self.deliveries.undo(client, task, stored_before=task.id not in inserted)
            if command is Command.TASK_GOT:
                self.send(client, Command.TASK_GOT, first, b'', b'0', b'0', b'')
        batch.outgoing.clear()
        self.queues.forget_new(inserted.values())
        self._answer_admin_replies_with_fault()

    def _flush_writes(self) -> None:
        """Commit what the batch staged (at close; the loop commits through :meth:`_commit`)."""
        self.store.commit()

    def _tick(self, now: float) -> None:
        """Heartbeats out, silent clients declared dead, orphans past their grace requeued, memory given back."""
        self.directory.check_endpoints()
        self._check_peers(now)
        expired_many = self.queues.expire(now) > 100
        freed = self.outbound.take_memory_freed()  # (each flag taken, none skipped)
        freed |= self.intake.memory_freed
        self.intake.memory_freed = False
        self.trim.tick(now, expired_many or freed)
        self.deliveries.tick(self.listening.now)
        self._end_of_batch()
        self.intake.tick(now)

    def _check_peers(self, now: float) -> None:
        """Silent clients declared dead, by the listening clock (as of when this turn began reading: what peers sent
        while a batch took long is read in the next turn, it is no silence); heartbeats to the others."""
        deadline = self.listening.now - self.config.peer_timeout
        for client in list(self.clients.values()):
            if client.last_seen < deadline:
                self.limited_log.warning(
                    'client %s (%s) silent for %.1fs: declared dead, %d held task(s) go back to their queues',
                    client.name,
                    client.routing_id.decode(errors='replace'),
                    self.listening.now - client.last_seen,
                    len(client.held),
                    key=('silent', client.routing_id),
                )
                silence = f'its holder was silent for {self.listening.now - client.last_seen:.0f} s'
                self.drop_client(client, released=False, why=silence)
            elif now - client.last_sent >= self.config.heartbeat:
                self.send(client, Command.HEARTBEAT)

    # Sending ------------------------------------------------------------------------------------------------------

    def send(self, client: Client, command: Command, *args: bytes) -> None:
        """Send to a client's session (through its outbound queue: never blocks)."""
        if client.overflowed:
            return  # its session ends with this batch (the slow-client rule): nothing more is kept for it
        client.last_sent = time.monotonic()
        frames = [client.routing_id, *protocol.encode(command, *args)]
        self.outbound.send(client, frames, droppable=command is Command.BROADCAST)

    def answer(self, peer: Peer, command: Command, *args: bytes) -> None:
        """Answer a client through its session, a sender directly."""
        if isinstance(peer, Client):
            self.send(peer, command, *args)
        else:
            self.intake.send_raw(peer.socket, peer.routing_id, command, *args)

    def drop_client(self, client: Client, *, released: bool, why: str = 'its holder is gone') -> None:
        """End a client's session: its held tasks go back (``why`` goes into their history), its RPC identifiers
        free up, its callers are told."""
        session.drop_client(self, client, released=released, why=why)

    def _drop_overflowed(self) -> None:
        for client in self.outbound.take_overflowed():
            if self.clients.get(client.routing_id) is client:
                self.drop_client(client, released=False, why='its holder stopped reading its messages')

    # Dispatch -----------------------------------------------------------------------------------------------------

    def _handle(self, socket: zmq.Socket, frames: list[bytes]) -> None:
        """Decode a message and hand it to its handler (:data:`~aiida_zmq.broker.handlers.HANDLERS`)."""
        routing_id = frames[0]
        message = self.intake.decode(socket, frames)
        if message is None:
            return
        command = message.command
        client = self.clients.get(routing_id)
        try:
            protocol.check_arguments(message)
        except BadArgument as error:
            self.intake.bad_argument(socket, routing_id, message, error, session=client, send=self.send)
            return
        peer: Peer
        if command is Command.HELLO or (client is None and command in protocol.SESSIONLESS):
            peer = Sender(routing_id, socket)  # HELLO starts a session; a direct socket never says HELLO
        elif client is None:
            session.without_session(self, Sender(routing_id, socket), message)
            return
        else:
            client.last_seen = self.listening.now
            peer = client  # from a session (the I/O thread's PUBLISH too): answered through it, in order
        handler = HANDLERS.get(command)  # one for every command of protocol.FROM_CLIENT
        if handler is None:
            self.limited_log.warning(
                'client %s sent %s, which only the broker sends: dropped',
                client.name if client is not None else repr(routing_id),
                command.name,
                key=('broker-only', routing_id),
            )
            return
        try:
            handler(self, peer, message.args)
        except (protocol.ProtocolError, UnicodeDecodeError) as exception:  # a queue or identifier that is not UTF-8
            self.stats['malformed'] += 1
            self.limited_log.warning(
                'dropped a malformed %s from %s: %s',
                command.name,
                client.name if client is not None else repr(routing_id),
                exception,
                key=('malformed', routing_id),
            )
        except StoreError as exception:
            # The store failed under this request (disk full): the batch is lost, its commit says so to every
            # sender; this request gets the same answer, now.
            self.limited_log.error('%s', exception, key=('store',))
            self.intake.answer_error(socket, frames, ErrorCode.STORE, str(exception))
        except Exception:
            # A bug must not take the broker down with everyone's tasks: log it and carry on.
            self.limited_log.log(
                logging.ERROR,
                'error handling %s from %s',
                command.name,
                client.name if client is not None else repr(routing_id),
                key=('handler-failed', command),
                exc_info=True,
            )
