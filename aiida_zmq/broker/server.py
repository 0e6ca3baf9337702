"""The broker: ROUTER sockets, task queues on a durable store, RPC routing, broadcast and heartbeats.

One thread runs one poll loop. Each turn of the loop is a batch: it reads what the sockets have (up to
``batch_size`` messages), handles them, commits the store once (group commit), then sends the confirms that waited
for that commit and hands ready tasks to consumers with room for them. The broker never blocks on a peer: every send
is non-blocking, what a peer cannot take yet waits in that peer's outbound queue (bounded in bytes and messages), a
peer with messages waiting gets no deliveries, and one that cannot take what must reach it, or takes nothing for the
peer timeout, loses its session and its tasks to the others (the slow-client rule, ``docs/protocol.md``, Limits).

This module imports nothing from AiiDA: payloads are opaque bytes.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from .. import protocol
from ..exceptions import StoreError
from ..protocol import Command, ErrorCode
from ..ratelimit import RateLimitedLog
from ..security import ensure_private_dir
from ..store import STORE_FILENAME, StoredTask, TaskStore
from ..store_identity import StoreIdentity
from . import admin
from .config import BrokerConfig
from .datadir import DataDirectory, default_endpoint
from .deliveries import Deliveries
from .liveness import ListeningClock
from .peers import Client, Outbound, Sender
from .queues import QueueState, TaskQueues
from .rpc_routes import RpcRoutes
from .store_fault import StoreFault

__all__ = ('Broker', 'BrokerConfig', 'default_endpoint')

LOGGER = logging.getLogger(__name__)

# The broker gives free heap memory back to the system this often (and a second after a large release).
TRIM_INTERVAL = 5.0
# A correlation the broker echoes in an ERROR; the communicator's are short decimals, a longer one is not a request.
MAX_CORRELATION = 1024


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
        self.queues = TaskQueues(self.config)
        self.rpc = RpcRoutes()
        # (peer, correlation, task id, sender's session): confirms wait for the batch's commit
        self._confirms: list[tuple[Client | Sender, bytes, int, bytes | None]] = []
        self._inserted: list[StoredTask] = []  # the new tasks of the batch (refused if its commit fails)
        self._outgoing: list[tuple[Client, StoredTask, Command, bytes]] = []  # deliveries sent after the commit
        self._admin_replies: list[tuple[Client, bytes, bytes]] = []  # wait for the batch's commit
        self._unknown_warned: dict[bytes, float] = {}
        self._memory_freed = False  # much memory was freed: give it back to the system at the next tick
        self._dispatch_more = False  # the last dispatch left work for a consumer that had its burst
        self.store_fault = StoreFault(self.config.store_retry, self.config.store_retry_max)
        self._last_trim = 0.0
        self.stats = collections.Counter[str]()
        # Peers' silence and the reclaim grace are counted in time the broker spent listening (liveness.py).
        self.listening = ListeningClock(self.config.heartbeat, self.config.peer_timeout)
        self.deliveries = Deliveries(self.config, self.queues, self.stats, self.limited_log)
        self.outbound = Outbound(self.config, self.stats, self.limited_log, self.queues.wake, self.listening)

    # Lifecycle ----------------------------------------------------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        assert self._store is not None, 'the broker is not started'
        return self._store

    def open(self) -> None:
        """Take the data directory's lock, load the store and bind the sockets."""
        try:
            self.directory.take_lock()
            self.directory.check_binds()  # before the store is touched: a bad --bind changes nothing
            store_path = self.data_dir / STORE_FILENAME
            # Refuse a store that is not the one the broker left (truncated, its -wal lost, another file).
            self._identity = StoreIdentity(self.data_dir)
            self._identity.check_before_open()
            self._store = TaskStore(store_path, fsync=self.config.fsync, history=self.config.task_history)
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
                        frames, cost = self._receive(socket)
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

    def _end_of_batch(self) -> None:
        """Hand out ready tasks, commit the batch (stores and deliveries in one transaction), then confirm what it
        stored and send the deliveries: nothing leaves before the commit that records it."""
        self.deliveries.release_due(time.monotonic())
        if self.outbound.overflowed:
            self._drop_overflowed()  # before the dispatch: their tasks go to the others in this batch
        writable = self.store_fault.writable()
        self._dispatch_more = False
        if not writable and not self._inserted:
            # The store failed and its next try is not due: no deliveries (they need a commit), no commit; what the
            # batch did waits in memory. Heartbeats and ADMIN are answered all the same.
            self._answer_admin_replies_with_fault()
            self.outbound.flush()
            return
        if writable:  # (a batch with new tasks tries the store early: the senders asked, and it may have room now)
            try:
                self._dispatch()
            except StoreError:
                pass  # the store failed reading a queue's next page: the batch is lost, its commit below says so
        if not self._commit():
            return
        # Confirms first: the senders wait for them (consumers, woken first, would take the CPU from them). A sender
        # whose task this batch delivers to its own session (to a subscriber, not to a TASK_GET) learns it from the
        # confirm (``held_here``; the delivery goes out below) and waits for its subscriber, the order RabbitMQ gives.
        if self._confirms:
            delivered = {
                (client.routing_id, task.id)
                for client, task, command, _ in self._outgoing
                if command is Command.TASK_DELIVER
            }
            for peer, correlation, task_id, session in self._confirms:
                held_here = (session, task_id) in delivered
                self._answer(
                    peer, Command.TASK_CONFIRM, correlation, protocol.number(task_id), protocol.flag(held_here)
                )
            self._confirms.clear()
        for client, correlation, response in self._admin_replies:
            self._send(client, Command.ADMIN_REPLY, correlation, b'ok', response)
        self._admin_replies.clear()
        for client, task, command, first in self._outgoing:
            self._send_delivery(client, task, command, first)
        self._outgoing.clear()
        self.outbound.flush()

    def _commit(self) -> bool:
        try:
            written = self.store.commit()
        except StoreError as exception:
            self._batch_failed(exception)
            return False
        if written:
            self.stats['commits'] += 1  # `aiida-zmq top` shows the commit rate
        self._inserted.clear()
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
        for client, correlation, _ in self._admin_replies:
            self._admin_error(client, correlation, f'done in the broker, not stored yet: {text}')
        self._admin_replies.clear()

    def _batch_failed(self, exception: StoreError) -> None:
        """Nothing of this batch is stored. Its new tasks are refused (loudly, never confirmed) and forgotten; its
        deliveries were not sent, so their tasks are back in their queues; everything else the batch changed (acks,
        requeues, dead letters) stays as the broker holds it in memory and is written with the next commit."""
        self.store_fault.failed(exception)
        self.stats['store_failures'] += 1
        self.limited_log.error(
            '%s; refusing the tasks of this batch, trying again in %.1fs',
            exception,
            self.store_fault.backoff,
            key=('store',),
        )
        inserted = {task.id: task for task in self._inserted}
        self._inserted.clear()
        self.store.unstage(inserted)  # their ids are free again: the next insert may reuse them
        for peer, correlation, _, _ in self._confirms:
            self._answer(peer, Command.ERROR, correlation, ErrorCode.STORE, str(exception).encode())
        self._confirms.clear()
        for client, task, command, first in self._outgoing:
            self.deliveries.undo(client, task, stored_before=task.id not in inserted)
            if command is Command.TASK_GOT:
                self._send(client, Command.TASK_GOT, first, b'', b'0', b'0', b'')
        self._outgoing.clear()
        for name in {task.queue for task in inserted.values()}:
            queue = self.queues.get(name)
            if queue is not None:
                waiting = {task.id for task in inserted.values() if task.queue == name}
                queue.backlog = max(0, queue.backlog - (len(waiting) - queue.remove(waiting)))
                self.queues.wake(name)
        for queue in self.queues.values():  # a dispatch cut short by the failure left some unlooked at
            if queue.consumers and len(queue):
                self.queues.wake(queue.name)
        self._answer_admin_replies_with_fault()

    def _flush_writes(self) -> None:
        """Commit what the batch staged (at close; the loop commits through :meth:`_commit`)."""
        self.store.commit()

    def _tick(self, now: float) -> None:
        """Heartbeats out, silent clients declared dead, orphans past their grace requeued."""
        self.directory.check_endpoints()
        self._check_peers(now)
        if self.queues.expire(now) > 100:
            self._memory_freed = True
        self._memory_freed |= self.outbound.take_memory_freed()
        if now - self._last_trim >= (1.0 if self._memory_freed else TRIM_INTERVAL):
            # After a flood the freed memory stays with the process unless it is handed back (1.2 GiB did).
            self._memory_freed = False
            self._last_trim = now
            trim_heap()
        self.deliveries.tick(self.listening.now)
        self._end_of_batch()
        stale = [key for key, when in self._unknown_warned.items() if when < now - 60]
        for key in stale:
            del self._unknown_warned[key]

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
                self._send(client, Command.HEARTBEAT)

    # Sending ------------------------------------------------------------------------------------------------------

    def _send(self, client: Client, command: Command, *args: bytes) -> None:
        if client.overflowed:
            return  # its session ends with this batch (the slow-client rule): nothing more is kept for it
        client.last_sent = time.monotonic()
        frames = [client.routing_id, *protocol.encode(command, *args)]
        self.outbound.send(client, frames, droppable=command is Command.BROADCAST)

    def _drop_overflowed(self) -> None:
        for client in self.outbound.take_overflowed():
            if self.clients.get(client.routing_id) is client:
                self.drop_client(client, released=False, why='its holder stopped reading its messages')

    def _answer(self, peer: Client | Sender, command: Command, *args: bytes) -> None:
        """Answer a client through its session, a sender directly."""
        if isinstance(peer, Client):
            self._send(peer, command, *args)
        else:
            self._send_raw(peer.socket, peer.routing_id, command, *args)

    def _send_raw(self, socket: zmq.Socket, routing_id: bytes, command: Command, *args: bytes) -> None:
        """Answer a peer that has no session (no Client): best effort, never blocking."""
        try:
            socket.send_multipart([routing_id, *protocol.encode(command, *args)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # Receiving ----------------------------------------------------------------------------------------------------

    def _receive(self, socket: zmq.Socket) -> tuple[list[bytes] | None, int]:
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

    def _refuse(self, socket: zmq.Socket, frames: list[bytes], code: bytes, size: int, count: int) -> None:
        """Answer a message that was too large or had too many frames (by its correlation, when it is a request)."""
        routing_id = frames[0]
        command = frames[2][0] if len(frames) > 2 and len(frames[2]) == 1 else None
        name = Command(command).name if command in _COMMANDS else 'message'
        if code == ErrorCode.TOO_LARGE:
            self.stats['too_large'] += 1
            self._memory_freed = True
            text = f'{name} of {size} bytes exceeds the broker maximum of {self.config.max_message_bytes} bytes'
        else:
            self.stats['malformed'] += 1
            text = f'{name} takes {protocol.frame_count(frames[2]) - 2} arguments, got {count - 2}'
        self.limited_log.warning('client %r: %s: dropped', routing_id, text, key=(code, routing_id))
        self._answer_error(socket, frames, code, text)

    def _answer_error(self, socket: zmq.Socket, frames: Sequence[bytes], code: bytes, text: str) -> None:
        """Answer a message that cannot be handled with ERROR: a request by its correlation; anything else only when
        it was too large (the sender learns the limit; a HELLO too large fails the client's connect)."""
        request = (
            len(frames) >= 4
            and frames[1] == protocol.SIGNATURE
            and len(frames[2]) == 1
            and frames[2][0] in _CORRELATED
            and len(frames[3]) <= MAX_CORRELATION
        )
        if request:
            self._send_raw(socket, frames[0], Command.ERROR, frames[3], code, text.encode())
        elif code == ErrorCode.TOO_LARGE:
            self._send_raw(socket, frames[0], Command.ERROR, b'', code, text.encode())

    def _handle(self, socket: zmq.Socket, frames: list[bytes]) -> None:
        routing_id = frames[0]
        try:
            message = protocol.decode(frames[1:])
        except protocol.VersionMismatch as exception:
            self.limited_log.warning('client %r: %s', routing_id, exception, key=('version', routing_id))
            self._send_raw(socket, routing_id, Command.ERROR, b'', ErrorCode.VERSION, str(exception).encode())
            return
        except protocol.ProtocolError as exception:
            self.stats['malformed'] += 1
            self.limited_log.warning(
                'dropped a malformed message from %r: %s', routing_id, exception, key=('malformed', routing_id)
            )
            self._answer_error(socket, frames, ErrorCode.MALFORMED, str(exception))
            return

        client = self.clients.get(routing_id)
        if message.command is Command.HELLO:
            self._on_hello(socket, routing_id, message.args)
            return
        if message.command in protocol.SESSIONLESS:
            # Needs no session: a caller thread's direct socket (see the communicator) never says HELLO.
            if client is not None:
                client.last_seen = self.listening.now
            try:
                # From a session (the I/O thread's PUBLISH), answered through it, in order with the rest.
                self._handlers[message.command](
                    self, client if client is not None else Sender(routing_id, socket), message.args
                )
            except (protocol.ProtocolError, UnicodeDecodeError) as exception:
                self.stats['malformed'] += 1
                self.limited_log.warning(
                    'dropped a malformed %s from %r: %s',
                    message.command.name,
                    routing_id,
                    exception,
                    key=('malformed', routing_id),
                )
            return
        if client is None:
            self._on_unknown_client(socket, routing_id, message)
            return
        client.last_seen = self.listening.now
        handler = self._handlers.get(message.command)
        if handler is None:
            self.limited_log.warning(
                'client %s sent %s, which only the broker sends: dropped',
                client.name,
                message.command.name,
                key=('broker-only', routing_id),
            )
            return
        try:
            handler(self, client, message.args)
        except (protocol.ProtocolError, UnicodeDecodeError) as exception:  # a queue or identifier that is not UTF-8
            self.stats['malformed'] += 1
            self.limited_log.warning(
                'dropped a malformed %s from %s: %s',
                message.command.name,
                client.name,
                exception,
                key=('malformed', routing_id),
            )
        except StoreError as exception:
            # The store failed under this request (disk full): the batch is lost, its commit says so to every
            # sender; this request gets the same answer, now.
            self.limited_log.error('%s', exception, key=('store',))
            self._answer_error(socket, frames, ErrorCode.STORE, str(exception))
        except Exception:
            # A bug must not take the broker down with everyone's tasks: log it and carry on.
            self.limited_log.log(
                logging.ERROR,
                'error handling %s from %s',
                message.command.name,
                client.name,
                key=('handler-failed', message.command),
                exc_info=True,
            )

    def _on_unknown_client(self, socket: zmq.Socket, routing_id: bytes, message: protocol.Message) -> None:
        """A message from a client without a session: the broker restarted, or declared the client dead."""
        if message.command in (Command.TASK_ACK, Command.TASK_REPLY) and message.args:
            # A holder finishing a task it was given before a restart: accept it for an unclaimed orphan.
            try:
                task_id, attempt = protocol.to_int(message.args[0]), protocol.to_int(message.args[1])
            except protocol.ProtocolError:
                return
            final = message.command is Command.TASK_ACK or message.args[2] == protocol.FLAG_TRUE
            task = self.deliveries.answered_without_session(routing_id, task_id, attempt, final)
            if task is not None and message.command is Command.TASK_REPLY:
                self._forward_result(task, message.args[3], final=True)
        if message.command in _CORRELATED:
            # A request: answer it by its correlation, so that the client sends it again after its HELLO.
            self._send_raw(
                socket, routing_id, Command.ERROR, message.args[0], ErrorCode.UNKNOWN_CLIENT, b'no session: send HELLO'
            )
            return
        now = time.monotonic()
        if now - self._unknown_warned.get(routing_id, 0.0) > 0.5 or message.command is Command.HEARTBEAT:
            self._unknown_warned[routing_id] = now
            self._send_raw(socket, routing_id, Command.ERROR, b'', ErrorCode.UNKNOWN_CLIENT, b'no session: send HELLO')

    # Session ------------------------------------------------------------------------------------------------------

    def _on_hello(self, socket: zmq.Socket, routing_id: bytes, args: Sequence[bytes]) -> None:
        """Start a session, or refresh one: the client's list of tasks it holds is authoritative."""
        name = bytes(args[0]).decode(errors='replace')
        claimed: dict[int, int] = {}
        for item in bytes(args[2]).split(b','):
            task_id_text, _, attempt_text = item.partition(b':')
            try:
                claimed[int(task_id_text)] = int(attempt_text)
            except ValueError:
                continue
        try:
            pid = int(args[3] or 0)
        except ValueError:
            pid = 0
        client = self.clients.get(routing_id)
        known = client is not None
        if client is None:
            client = self.clients[routing_id] = Client(routing_id, socket, name, last_seen=self.listening.now, pid=pid)
        else:
            # The same communicator saying hello again (it lost touch with us): keep its session.
            client.socket, client.last_seen = socket, self.listening.now
        reclaimed = self.deliveries.hello(client, claimed, known)
        self.limited_log.info(
            'client %s connected (%s), reclaimed %d task(s)',
            name,
            routing_id.decode(errors='replace'),
            reclaimed,
            key=('hello', routing_id),
        )
        self._send(
            client,
            Command.WELCOME,
            self.epoch.encode(),
            protocol.number(int(self.config.heartbeat * 1000)),
            protocol.number(self.config.max_message_bytes),
        )

    def _on_heartbeat(self, client: Client, args: Sequence[bytes]) -> None:
        pass  # last_seen is updated for every message

    def _on_bye(self, client: Client, args: Sequence[bytes]) -> None:
        self.limited_log.info(
            'client %s said goodbye, %d held task(s) released',
            client.name,
            len(client.held),
            key=('bye', client.routing_id),
        )
        self.drop_client(client, released=True, why='its holder said goodbye')

    def drop_client(self, client: Client, *, released: bool, why: str = 'its holder is gone') -> None:
        """Forget a client: its held tasks go back (at once), its RPC identifiers free up, its callers are told."""
        self.clients.pop(client.routing_id, None)
        self.outbound.forget(client)
        for queue_name in client.prefetch:
            queue = self.queues.get(queue_name)
            if queue is not None and client in queue.consumers:
                queue.consumers.remove(client)
                self.queues.wake(queue_name)  # to forget it, if nothing else holds it
        self.deliveries.holder_gone(client, released, why)
        for call in self.rpc.forget(client):
            if call.caller.routing_id in self.clients:
                self._send(
                    call.caller,
                    Command.RPC_UNROUTABLE,
                    call.correlation,
                    b'the recipient disconnected before it answered',
                )

    # Tasks --------------------------------------------------------------------------------------------------------

    def _on_task_send(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, queue_name, no_reply, payload = args
        self._store_task(client, correlation, queue_name, no_reply == protocol.FLAG_TRUE, client.routing_id, payload)

    def _on_task_submit(self, sender: Client | Sender, args: Sequence[bytes]) -> None:
        """A task from a caller thread's own socket (no session): the result goes to the session it names."""
        correlation, session, queue_name, no_reply, payload = args
        no_reply_flag = no_reply == protocol.FLAG_TRUE
        self._store_task(sender, correlation, queue_name, no_reply_flag, bytes(session) or None, payload)

    def _store_task(
        self,
        peer: Client | Sender,
        correlation: bytes,
        queue_name: bytes,
        no_reply: bool,
        session: bytes | None,
        payload: bytes,
    ) -> None:
        """Store a task in this batch; its confirm goes to ``peer`` once the batch is committed.

        ``session`` is the sender's session: it gets the task's results (unless ``no_reply``), and the confirm says
        whether the task went to that same session in this batch.
        """
        name = bytes(queue_name).decode()
        queue = self.queues.open(name)
        if queue is None:
            self.stats['refused_queue_limit'] += 1
            text = (
                f'the broker holds its maximum of {self.config.max_queues} queues (max_queues): a task for a new queue '
                'is refused until some queue is empty and nobody consumes it'
            )
            self.limited_log.warning('%s (queue %r)', text, name[:80], key=('queue-limit',))
            self._answer(peer, Command.ERROR, correlation, ErrorCode.STORE, text.encode())
            return
        reply_to = None if no_reply else session
        try:
            task_id = self.store.insert(name, payload, no_reply, reply_to, correlation)
        except StoreError as exception:
            self.limited_log.error('%s', exception, key=('store',))
            self._answer(peer, Command.ERROR, correlation, ErrorCode.STORE, str(exception).encode())
            return
        task = StoredTask(task_id, name, payload, no_reply, reply_to, correlation, 0)
        queue.add_new(task, self.config)
        self.queues.wake(name)
        self._inserted.append(task)
        self._confirms.append((peer, correlation, task_id, session))
        self.stats['tasks_stored'] += 1

    def _on_consume(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, queue_name, prefetch_text = args
        name = bytes(queue_name).decode()
        prefetch = protocol.to_int(prefetch_text)
        if prefetch < 0:
            raise protocol.ProtocolError(f'prefetch must be 0 (unlimited) or more, got {prefetch}')
        if name not in client.prefetch and len(client.prefetch) >= self.config.max_queues_per_client:
            self._refuse_consume(
                client,
                correlation,
                f'this client consumes {len(client.prefetch)} queues, the most one client may '
                f'(max_queues_per_client={self.config.max_queues_per_client}): cancel one first',
            )
            return
        queue = self.queues.open(name)
        if queue is None:
            self._refuse_consume(
                client,
                correlation,
                f'the broker holds its maximum of {self.config.max_queues} queues (max_queues): a new queue can be '
                'consumed once some queue is empty and nobody consumes it',
            )
            return
        client.prefetch[name] = prefetch
        if client not in queue.consumers:
            queue.consumers.append(client)
        self.queues.wake(name)
        self._send(client, Command.DONE, correlation)

    def _refuse_consume(self, client: Client, correlation: bytes, text: str) -> None:
        self.stats['refused_queue_limit'] += 1
        self.limited_log.warning('client %s: CONSUME refused: %s', client.name, text, key=('queue-limit', client))
        self._send(client, Command.ERROR, correlation, ErrorCode.LIMIT, text.encode())

    def _on_cancel(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, queue_name = args
        name = bytes(queue_name).decode()
        client.prefetch.pop(name, None)
        queue = self.queues.get(name)
        if queue is not None and client in queue.consumers:
            queue.consumers.remove(client)
            self.queues.wake(name)  # to forget it, if nothing else holds it
        self._send(client, Command.DONE, correlation)

    def _held_task(self, client: Client, args: Sequence[bytes]) -> StoredTask | None:
        return self.deliveries.answered(client, protocol.to_int(args[0]), protocol.to_int(args[1]))

    def _on_task_reply(self, client: Client, args: Sequence[bytes]) -> None:
        task = self._held_task(client, args)
        if task is None:
            return
        final = args[2] == protocol.FLAG_TRUE
        if final:
            self.deliveries.finish(client, task)
        self._forward_result(task, args[3], final)

    def _forward_result(self, task: StoredTask, payload: bytes, final: bool) -> None:
        if task.no_reply or task.reply_to is None or task.correlation is None:
            return
        sender = self.clients.get(task.reply_to)
        if sender is None:
            LOGGER.debug('sender of task %d is gone: its result is dropped', task.id)
            return
        self._send(sender, Command.TASK_RESULT, task.correlation, protocol.flag(final), payload)

    def _on_task_ack(self, client: Client, args: Sequence[bytes]) -> None:
        task = self._held_task(client, args)
        if task is not None:
            self.deliveries.finish(client, task)

    def _on_task_nack(self, client: Client, args: Sequence[bytes]) -> None:
        task = self._held_task(client, args)
        if task is not None:
            self.deliveries.nack(client, task, rejected=args[2] == protocol.FLAG_TRUE)

    def _dispatch(self) -> None:
        """Hand out tasks: at most ``send_hwm`` deliveries and half the outbound byte budget per consumer per turn,
        which ZeroMQ's queue to a consumer that reads takes at once (a burst of a whole backlog, for a consumer
        without prefetch limit, would sit in its outbound queue and end its session by its size alone)."""
        handed: dict[Client, list[int]] = {}
        byte_burst = max(1, self.config.outbound_bytes // 2)

        def may_take(consumer: Client) -> bool:
            count, size = handed.get(consumer, (0, 0))
            return count < self.config.send_hwm and size < byte_burst

        def deliver(consumer: Client, task: StoredTask, queue: QueueState) -> None:
            totals = handed.setdefault(consumer, [0, 0])
            totals[0] += 1
            totals[1] += len(task.payload)
            self._deliver(consumer, task, Command.TASK_DELIVER, queue.name.encode())

        self._dispatch_more = self.queues.dispatch(time.monotonic(), self.deliveries.next_task, deliver, may_take)

    def _deliver(self, client: Client, task: StoredTask, command: Command, first: bytes) -> None:
        """Hand ``task`` to ``client``; the message goes out after the batch's commit (see :meth:`_end_of_batch`)."""
        self.deliveries.deliver(client, task, fetched=command is Command.TASK_GOT)
        self._outgoing.append((client, task, command, first))

    def _send_delivery(self, client: Client, task: StoredTask, command: Command, first: bytes) -> None:
        if not client.held.holds(task):
            return  # taken back before the commit (the client left or released it in the same batch)
        self._send(
            client,
            command,
            first,
            protocol.number(task.id),
            protocol.number(task.attempts),
            protocol.flag(task.no_reply),
            task.payload,
        )

    def _on_task_get(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, queue_name = args
        name = bytes(queue_name).decode()
        if not self.store_fault.writable():  # handing out a task needs a commit
            text = self.store_fault.text(self.data_dir)
            self._send(client, Command.ERROR, correlation, ErrorCode.STORE, text.encode())
            return
        queue = self.queues.get(name)
        task = self.deliveries.next_task(queue) if queue is not None else None
        if queue is not None:
            self.queues.wake(name)  # emptied by this get, it may be forgotten
        if task is None:
            self._send(client, Command.TASK_GOT, correlation, b'', b'0', b'0', b'')
            return
        self._deliver(client, task, Command.TASK_GOT, correlation)

    # RPC ----------------------------------------------------------------------------------------------------------

    def _on_rpc_register(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, identifier = args
        registered = self.rpc.register(client, bytes(identifier).decode())
        self._send(client, Command.RPC_REGISTERED, correlation, b'ok' if registered else b'duplicate')

    def _on_rpc_unregister(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, identifier = args
        self.rpc.unregister(client, bytes(identifier).decode())
        self._send(client, Command.DONE, correlation)

    def _on_rpc_call(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, identifier, payload = args
        self._route_call(client, client, correlation, identifier, payload)

    def _on_rpc_submit(self, sender: Client | Sender, args: Sequence[bytes]) -> None:
        """An RPC from a caller thread's own socket: answered there, its replies go to the session it names."""
        correlation, session, identifier, payload = args
        caller = self.clients.get(bytes(session))
        if caller is None:
            # Its replies would have nowhere to go: the caller sends it again once its session is welcomed.
            self._answer(sender, Command.ERROR, correlation, ErrorCode.UNKNOWN_CLIENT, b'no such session: say HELLO')
            return
        self._route_call(caller, sender, correlation, identifier, payload)

    def _route_call(
        self, caller: Client, peer: Client | Sender, correlation: bytes, identifier: bytes, payload: bytes
    ) -> None:
        """Hand a call to its recipient, then tell ``peer`` (``DONE``), or tell it at once that nobody holds it."""
        routed = self.rpc.open_call(caller, correlation, bytes(identifier).decode())
        if routed is None:
            reason = b"no subscriber with identifier '" + bytes(identifier) + b"'"
            self._answer(peer, Command.RPC_UNROUTABLE, correlation, reason)
            return
        call_id, owner = routed
        self._send(owner, Command.RPC_REQUEST, protocol.number(call_id), identifier, payload)
        # After the request: a client calling its own subscriber has it handled when its rpc_send returns.
        self._answer(peer, Command.DONE, correlation)

    def _on_rpc_reply(self, client: Client, args: Sequence[bytes]) -> None:
        call_id = protocol.to_int(args[0])
        call = self.rpc.answer(client, call_id, final=args[1] == protocol.FLAG_TRUE)
        if call is None:
            LOGGER.debug('reply from %s for unknown call %d dropped', client.name, call_id)
            return
        if call.caller.routing_id in self.clients:
            self._send(call.caller, Command.RPC_RESULT, call.correlation, args[1], args[2])

    # Broadcast ----------------------------------------------------------------------------------------------------

    def _on_subscribe(self, client: Client, args: Sequence[bytes]) -> None:
        client.subscribed = True
        self._send(client, Command.DONE, args[0])

    def _on_unsubscribe(self, client: Client, args: Sequence[bytes]) -> None:
        client.subscribed = False

    def _on_publish(self, sender: Client | Sender, args: Sequence[bytes]) -> None:
        """A broadcast, from a session or a direct socket (it needs no session): DONE, then to every subscriber.

        DONE first: the broker has taken the broadcast, and hands it to every subscriber in this same call. The sender
        goes on while the subscribers wake, instead of after them (a third of a broadcast's round trip with ten).
        """
        correlation, payload = args
        self.stats['broadcasts'] += 1
        self._answer(sender, Command.DONE, correlation)
        for peer in self.clients.values():
            if peer.subscribed:
                self._send(peer, Command.BROADCAST, payload)

    # Administration -----------------------------------------------------------------------------------------------

    def _on_admin(self, client: Client, args: Sequence[bytes]) -> None:
        correlation, request_bytes = args
        try:
            op, operation, arguments = admin.parse(request_bytes)
        except admin.AdminRequestError as exception:
            self._admin_error(client, correlation, str(exception))
            return
        try:
            response = operation.function(self, **arguments)
        except StoreError as exception:  # it needed the store and the store failed: nothing was changed
            self.limited_log.error('ADMIN %s: %s', op, exception, key=('store',))
            self._admin_error(client, correlation, f'{op} needs the task store, which fails: {exception}')
            return
        except Exception:
            # A bug, not bad input (the arguments were checked): the caller still gets an answer, not a timeout.
            self.limited_log.log(
                logging.ERROR, 'ADMIN %s from %s failed', op, client.name, key=('admin-failed', op), exc_info=True
            )
            self._admin_error(client, correlation, f'{op} failed inside the broker: see its log')
            return
        if operation.changes_store:
            # Answered after the batch's commit, like task confirms (or with the store's fault, if it fails).
            self._admin_replies.append((client, correlation, json.dumps(response).encode()))
        else:
            self._send(client, Command.ADMIN_REPLY, correlation, b'ok', json.dumps(response).encode())

    def _admin_error(self, client: Client, correlation: bytes, text: str) -> None:
        self._send(client, Command.ADMIN_REPLY, correlation, b'error', json.dumps(text).encode())

    #: One handler per command a client sends (HELLO aside); those of protocol.SESSIONLESS also come from a socket
    #: without a session (the communicator's direct sockets) and are answered on that socket.
    _handlers: dict[Command, Callable] = {
        Command.TASK_SUBMIT: _on_task_submit,
        Command.RPC_SUBMIT: _on_rpc_submit,
        Command.PUBLISH: _on_publish,
        Command.HEARTBEAT: _on_heartbeat,
        Command.BYE: _on_bye,
        Command.TASK_SEND: _on_task_send,
        Command.CONSUME: _on_consume,
        Command.CANCEL: _on_cancel,
        Command.TASK_REPLY: _on_task_reply,
        Command.TASK_ACK: _on_task_ack,
        Command.TASK_NACK: _on_task_nack,
        Command.TASK_GET: _on_task_get,
        Command.RPC_REGISTER: _on_rpc_register,
        Command.RPC_UNREGISTER: _on_rpc_unregister,
        Command.RPC_CALL: _on_rpc_call,
        Command.RPC_REPLY: _on_rpc_reply,
        Command.SUBSCRIBE: _on_subscribe,
        Command.UNSUBSCRIBE: _on_unsubscribe,
        Command.ADMIN: _on_admin,
    }

    # Introspection ------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """A JSON-able view of the broker's state (for status commands and tests)."""
        return {
            'epoch': self.epoch,
            'pid': os.getpid(),
            'uptime': time.time() - self.started,
            'endpoints': self.endpoints,
            'queues': {name: {'depth': len(q), 'consumers': len(q.consumers)} for name, q in self.queues.items()},
            'clients': [
                {
                    'name': c.name,
                    'pid': c.pid,
                    'held': len(c.held),
                    'held_per_queue': dict(c.held.per_queue),
                    'held_ids': sorted(c.held.tasks)[:20],  # the oldest it holds (`aiida-zmq top`)
                    'prefetch': dict(c.prefetch),
                    'subscribed': c.subscribed,
                }
                for c in self.clients.values()
            ],
            'orphans': len(self.deliveries.orphans),
            'store_fault': self.store_fault.status(),
            'stats': {**self.stats, 'log_lines_suppressed': self.limited_log.suppressed_total},
            # What the operator chose (`serve` options, or the AiiDA profile's broker options through the watcher).
            'settings': {
                'heartbeat': self.config.heartbeat,
                'peer_timeout': self.config.peer_timeout,
                'max_deliveries': self.config.max_deliveries,
                'max_message_bytes': self.config.max_message_bytes,
                'max_queues': self.config.max_queues,
                'outbound_bytes': self.config.outbound_bytes,
                'fsync': self.config.fsync,
            },
        }


_CORRELATED = protocol.REQUESTS
_COMMANDS = frozenset(Command)
